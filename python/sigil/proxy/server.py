"""The proxy's HTTP side: an OpenAI-compatible server that forwards to an upstream.

Routes (below ``/v1``): ``POST chat/completions``, ``completions``, ``responses``
and ``embeddings`` are metered (:class:`~sigil.proxy.metering.Meter`);
``GET models`` is forwarded as it is (it costs no tokens). The transport is
native (rust/proxy.rs, through sigil.telemetry.proxy_transport): hyper on a
tokio runtime of its own thread accepts, routes, reads bodies to their bounds,
forwards through a pooled keep-alive client and relays answers and streams,
without the GIL. This module is its policy, called back synchronously with the
GIL held: :meth:`ProxyServer.admit` decides each call (parse, cap, budget:
the pure decisions of sigil.proxy.policy), and a :class:`_Flight` records it
(``done``, ``failed``, ``upstream_error``, and a stream's ``feed``/``stream_end``)
through the :class:`Meter`.

What the client sees is what the upstream sent, byte for byte, except:

* every output cap the client set (``max_tokens``, ``max_completion_tokens``,
  ``max_output_tokens``) is lowered to what the budget grants each completion
  (``n`` x ``best_of`` x prompts are reserved), and one is set when the client
  set none; a request whose completions cannot be bounded is refused with 400;
* a streamed chat call asks for usage in the stream
  (``stream_options.include_usage``); the usage-only event is dropped again for
  a client that did not ask for it;
* the proxy's own failures are OpenAI-shaped errors: 413 for a body over the
  limit, 503 ``server_overloaded`` (``retry-after: 1``, retried by the SDKs) for
  a call that found the memory of the calls in flight full
  (``max_in_flight_bytes``) for 2 s, nothing forwarded or recorded, 502 for an
  upstream that is down or sends a body that is not JSON,
  504 for one that is too slow, and, once the budget is spent, 429
  ``insufficient_quota`` with ``x-should-retry: false``, which the official SDKs
  raise at once instead of retrying (they retry 408, 409, 429 and 5xx unless
  that header says otherwise); while the session's log cannot be written, 503
  ``recording_failed`` (``x-should-retry: false``): a call is never served
  unrecorded;
* a stream that breaks mid-way ends with an SSE ``error`` event, which the
  official SDK raises as an ``APIError``.

Keys: ``Authorization`` goes to the upstream and nowhere else; no header is
ever logged, and the call's keys are cut out of any text logged about it (an
upstream's error may quote them). Bound to a non-loopback address the proxy requires a token
(``X-Sigil-Token: T``, or ``Authorization: Bearer T``, which is then replaced
by the proxy's own upstream key).
"""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from sigil.pipeline.calls import DEFAULT_CALL_CAP, chat_cap_field
from sigil.proxy.metering import BudgetExhausted, Call, Meter, Prompt, RecordingFailed
from sigil.proxy.policy import OutputPlan, Refusal, plan_output, secrets_of
from sigil.proxy.usage import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    Endpoint,
    StreamFollower,
    Usage,
    count_tokens,
    prompt_estimate_text,
    usage_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from sigil.telemetry.proxy_transport import ProxyTransport

__all__ = ["ProxyConfig", "ProxyServer", "UpstreamLoop"]

#: One SSE event larger than this is not a model's output: the stream is cut.
_MAX_EVENT_BYTES = 16 << 20
#: Tokens a stream may run past twice its grant before it is cut (an upstream
#: that ignores the cap it was sent; see _Flight.output_limit).
_OUTPUT_MARGIN = 256
_COMPONENT = re.compile(r"^[\w.:/@+-]{1,128}$")
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def _by_transport_index() -> tuple[Endpoint, ...]:
    """The policy of each metered endpoint, in the order of the transport's table
    (its index is what ``admit`` is given): the transport's table is the one
    list of routes; a route it has and the policy lacks fails here, at import."""
    from sigil.telemetry.proxy_transport import ENDPOINT_PATHS

    policies = {e.path: e for e in (CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS)}
    missing = [p for p in ENDPOINT_PATHS if p not in policies]
    if missing:  # pragma: no cover - a native module out of step with this one
        raise ImportError(f"sigil.proxy has no policy for the transport's routes {missing}")
    return tuple(policies[p] for p in ENDPOINT_PATHS)


#: The metered endpoints, by the transport's index (ENDPOINT_PATHS).
_ENDPOINTS = _by_transport_index()
#: On stop, calls in flight get this long to end (and be recorded); then they
#: are cut, and recorded as cut.
_GRACE_SECONDS = 5.0
_JSON = ("Content-Type", "application/json; charset=utf-8")

#: What the transport is answered: (status, body, headers).
Answer = tuple[int, bytes, list[tuple[str, str]]]


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
    #: the bytes the calls in flight may hold together (request bodies twice,
    #: answers read whole): past it a call waits 2 s for memory, then is
    #: answered 503 ``server_overloaded`` (rust/proxy.rs ``Memory``); at least
    #: ``2 * max_body_bytes + max_response_bytes``, at most 4 GiB
    max_in_flight_bytes: int = 512 << 20
    #: the output cap of a call whose client set none
    call_cap: int = DEFAULT_CALL_CAP
    #: the chat field set when the client set none: max_tokens (what every
    #: OpenAI-compatible server knows) or max_completion_tokens (what OpenAI's
    #: reasoning models require); None picks by the upstream's host
    cap_field: str | None = None

    def chat_cap_field(self) -> str:
        if self.cap_field is not None:
            return self.cap_field
        return chat_cap_field(self.upstream)


def openai_error(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    *,
    retry: bool | None = None,
) -> Answer:
    """An error shaped like OpenAI's, which every OpenAI client can read."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    headers = [_JSON]
    if retry is not None:
        headers.append(("x-should-retry", "true" if retry else "false"))
    return status, orjson.dumps(body), headers


def _sse_error(message: str, kind: str) -> bytes:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return b"data: " + orjson.dumps(body) + b"\n\n"


class ProxyServer:
    """Serves the OpenAI API on ``config.host:config.port`` and meters every call.

    The transport calls :meth:`admit` and :meth:`error` (and each call's
    :class:`_Flight`) on its own thread with the GIL held: they never wait. The
    Meter is only ever changed there once the transport runs."""

    def __init__(self, meter: Meter | None, config: ProxyConfig) -> None:
        #: None until :meth:`attach`: the port can be bound before the session is
        #: locked, so a taken port refuses the run before anything is written.
        self._meter = meter
        self.config = config
        self._upstream = config.upstream.rstrip("/")
        self._chat_cap_field = config.chat_cap_field()
        self._transport: ProxyTransport | None = None
        #: set by start() while the tokenizer is being built: calls wait
        self._tokenizer_pending = False
        #: set once stop() begins: a call cut then was cut by the stop, not its client
        self._stopping = False
        self.url: str | None = None

    # -- life ----------------------------------------------------------------------

    def attach(self, meter: Meter) -> None:
        """Start metering (calls that arrived before wait for this)."""
        self._meter = meter
        if self._transport is not None:
            self._transport.wake()

    @property
    def meter(self) -> Meter:
        assert self._meter is not None
        return self._meter

    async def start(self) -> str:
        """Bind and serve; returns the base URL clients use (``http://host:port/v1``)."""
        from sigil.pipeline.tokenizer import load_tokenizer
        from sigil.telemetry.proxy_transport import ProxyTransport

        # The tokenizer counts prompts near the end of the budget. Built on
        # first use (~150 ms, more on a loaded machine), it would be built on
        # the transport's thread by the first call that needs it, stalling
        # that call and every call behind it. It is built here, off the event
        # loop, while the session is prepared; calls wait for it (admit) on
        # the transport without blocking it.
        self._tokenizer_pending = True
        loading = asyncio.ensure_future(load_tokenizer())
        loading.add_done_callback(self._tokenizer_built)
        cfg = self.config
        transport = ProxyTransport(
            self, self._upstream, cfg.host, cfg.port, timeout=cfg.timeout,
            max_body_bytes=cfg.max_body_bytes, max_response_bytes=cfg.max_response_bytes,
            max_in_flight_bytes=cfg.max_in_flight_bytes, token=cfg.token, api_key=cfg.api_key,
            grace=_GRACE_SECONDS,
        )  # fmt: skip
        host, port = transport.start()
        self._transport = transport
        try:
            self._check_not_self(port)
        except BaseException:
            await self.stop()
            raise
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/v1"
        return self.url

    def _tokenizer_built(self, loading: asyncio.Future[Any]) -> None:
        """The tokenizer is built: calls waiting for it go on. One that failed
        to build fails the calls that need it (as it would have on first use)."""
        if not loading.cancelled():
            loading.exception()  # retrieved: raised again where it is needed
        self._tokenizer_pending = False
        if self._transport is not None:
            self._transport.wake()

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
        transport, self._transport = self._transport, None
        if transport is not None:
            await asyncio.to_thread(transport.stop)

    # -- the transport's policy ----------------------------------------------------------

    def error(self, kind: str, detail: str) -> Answer:
        """The answer to a ``GET /v1/models`` that failed (``kind``: timeout, unreachable)."""
        if kind == "timeout":
            return self._timeout_error()
        return self._unreachable(detail)

    def admit(
        self,
        index: int,
        raw: bytes,
        component_header: str | None,
        keys: list[tuple[str, str]] | None = None,
    ) -> tuple[Any, ...]:
        """Decide a metered call (``keys``: the ``(name, value)`` pairs of its key
        headers, cut out of what is logged about it): ``(0, flight, body,
        stream)`` forwards ``body``; ``(1, retry)`` waits until a call settles,
        then asks ``retry()``; ``(2, answer)`` answers at once."""
        if self._meter is None or self._tokenizer_pending:
            return (1, lambda: self.admit(index, raw, component_header, keys))
        endpoint = _ENDPOINTS[index]
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return 2, openai_error(
                400, "sigil proxy: the request body is not a JSON object",
                "invalid_request_error", "invalid_json",
            )  # fmt: skip
        # Each completion (n choices, best_of, each prompt of a list) may produce up to the cap.
        try:
            plan = plan_output(endpoint, body)
        except Refusal as exc:
            return 2, openai_error(400, f"sigil proxy: {exc}", "invalid_request_error", exc.code)
        prompt = self._count_prompt(body)
        secrets = secrets_of(keys or (), self.config.api_key, self.config.token)
        admission = _Admission(self, endpoint, body, component_header, plan, prompt, secrets)
        return admission()

    def _count_prompt(self, body: dict[str, Any]) -> Prompt:
        """The prompt's tokens to reserve: :meth:`Meter.prompt` (its UTF-8
        length while the budget is ample, else its count as the upstream bills it)."""
        return self.meter.prompt(body)

    # -- errors ----------------------------------------------------------------------

    def _timeout_text(self) -> str:
        return f"upstream {self._upstream} did not answer within {self.config.timeout:g}s"

    def _timeout_error(self) -> Answer:
        return openai_error(
            504, f"sigil proxy: {self._timeout_text()}", "upstream_error", "timeout"
        )

    def _unreachable_text(self, detail: str) -> str:
        return f"upstream {self._upstream} unreachable: {detail}"

    def _unreachable(self, detail: str) -> Answer:
        return openai_error(
            502, f"sigil proxy: {self._unreachable_text(detail)}", "upstream_error", "bad_gateway"
        )


class _Admission:
    """A parsed call being admitted: forwarded once the budget grants it."""

    __slots__ = (
        "body", "component", "endpoint", "model", "plan", "prompt", "secrets", "server",
        "stream", "wanted",
    )  # fmt: skip

    def __init__(
        self,
        server: ProxyServer,
        endpoint: Endpoint,
        body: dict[str, Any],
        component_header: str | None,
        plan: OutputPlan,
        prompt: Prompt,
        secrets: tuple[str, ...],
    ) -> None:
        self.server = server
        self.endpoint = endpoint
        self.body = body
        model = body.get("model")
        self.model = model if isinstance(model, str) else "unknown"
        self.component = _component(component_header, self.model)
        self.stream = body.get("stream") is True
        self.plan = plan
        self.wanted = plan.wanted(server.config.call_cap)
        self.prompt = prompt
        self.secrets = secrets

    def __call__(self) -> tuple[Any, ...]:
        server, endpoint, body, plan = self.server, self.endpoint, self.body, self.plan
        meter = server.meter
        endpoint_name = _ENDPOINT_NAMES.get(endpoint.path) or "/v1" + endpoint.path
        try:
            granted = meter.try_admit(self.wanted, self.prompt, plan.least)
        except BudgetExhausted as exc:
            meter.refuse(
                component=self.component, endpoint=endpoint_name, model=self.model,
                stream=self.stream, error=str(exc),
            )  # fmt: skip
            return 2, openai_error(
                429, f"sigil: {exc}", "insufficient_quota", "insufficient_quota", retry=False
            )
        except RecordingFailed as exc:
            return 2, openai_error(
                503, f"sigil: {exc}", "server_error", "recording_failed", retry=False
            )
        if granted is None:
            return 1, self  # everything left is promised to calls in flight
        requested = plan.requested
        if endpoint.cap_fields:
            default = server._chat_cap_field if endpoint is CHAT else endpoint.cap_fields[0]
            body.update(plan.caps_to_send(granted, default))
        asked_usage = True
        if self.stream and endpoint.stream_options:
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            asked_usage = options.get("include_usage") is True
            options["include_usage"] = True
            body["stream_options"] = options
        call = meter.start(
            component=self.component, endpoint=endpoint_name, model=self.model,
            stream=self.stream, granted=granted, requested=requested, prompt=self.prompt,
            secrets=self.secrets,
        )  # fmt: skip
        flight = _Flight(server, call, endpoint, body, asked_usage)
        try:
            forwarded = orjson.dumps(body)
        except BaseException as exc:
            flight.crashed(exc)
            raise
        return 0, flight, forwarded, self.stream


class _Flight:
    """One admitted call: the transport reports its outcome here, and it is recorded."""

    __slots__ = (
        "asked_usage", "body", "call", "endpoint", "first_ms", "follower", "output_limit",
        "past_grant", "server",
    )  # fmt: skip

    def __init__(
        self,
        server: ProxyServer,
        call: Call,
        endpoint: Endpoint,
        body: dict[str, Any],
        asked_usage: bool,
    ) -> None:
        self.server = server
        self.call = call
        self.endpoint = endpoint
        self.body = body
        self.asked_usage = asked_usage
        self.follower: StreamFollower | None = None
        self.first_ms: float | None = None
        #: the stream's text past which it is cut: twice the grant (a model
        #: whose tokenizer is not cl100k_base may count its grant as more), and
        #: a margin for a small one
        self.output_limit = 2 * call.granted + _OUTPUT_MARGIN
        self.past_grant = False

    def crashed(self, exc: BaseException) -> None:
        """Record the call as failed by a bug of the proxy's (then re-raised)."""
        if not self.call.settled:
            text = f"proxy error: {type(exc).__name__}: {exc}"
            self.server.meter.fail(self.call, text, category="proxy")

    def _guarded(self, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except BaseException as exc:
            self.crashed(exc)
            raise

    def done(self, status: int, raw: bytes) -> Answer | None:
        """A 2xx answer read whole: None relays it as it is."""
        try:
            return self._done(status, raw)
        except BaseException as exc:
            self.crashed(exc)
            raise

    def _done(self, status: int, raw: bytes) -> Answer | None:
        meter, call = self.server.meter, self.call
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            snippet = raw[:120].decode("utf-8", "replace")
            text = f"upstream returned a body that is not a JSON object: {snippet!r}"
            meter.fail(call, text, category="upstream_invalid", status=502)
            return openai_error(502, f"sigil proxy: {text}", "upstream_error", "bad_gateway")
        usage = usage_of(self.endpoint, data.get("usage"))
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            model = None
        meter.complete(call, usage, model=model, status=status)
        return None

    def failed(self, kind: str, detail: str) -> Answer:
        """The call failed before an answer came: recorded; the client's answer."""
        return self._guarded(lambda: self._failed(kind, detail))

    def _failed(self, kind: str, detail: str) -> Answer:
        server, meter, call = self.server, self.server.meter, self.call
        if kind == "timeout":
            meter.fail(call, server._timeout_text(), category="timeout", status=504)
            return server._timeout_error()
        if kind == "unreachable":
            meter.fail(
                call, server._unreachable_text(detail), category="upstream_unavailable",
                status=502,
            )  # fmt: skip
            return server._unreachable(detail)
        if kind == "stopped":
            text = "the proxy stopped before the call ended"
            if not call.settled:
                meter.fail(call, text, category="proxy_stopped")
            return openai_error(503, f"sigil proxy: {text}", "server_error", None)
        text = f"upstream response failed: {detail}"
        meter.fail(call, text, category="upstream_error", status=502)
        return openai_error(502, f"sigil proxy: {text}", "upstream_error", "bad_gateway")

    def upstream_error(self, status: int, raw: bytes) -> None:
        """The upstream answered an error (relayed as it is, so the client's SDK
        retries what it would retry)."""

        def record() -> None:
            detail = _error_detail(raw)
            text = f"upstream answered HTTP {status}" + (f": {detail}" if detail else "")
            self.server.meter.fail(self.call, text, category="upstream_error", status=status)

        self._guarded(record)

    def feed(self, chunk: bytes) -> bytes | None:
        """A chunk of the stream: what to relay (None: an event is too large, cut it)."""
        follower = self.follower
        if follower is None:
            follower = self.follower = StreamFollower(
                self.endpoint, drop_usage_only=not self.asked_usage
            )
        try:
            data = follower.feed(chunk)
        except BaseException as exc:
            self.crashed(exc)
            raise
        if follower.pending > _MAX_EVENT_BYTES:
            return None
        if follower.output_past(self.output_limit):
            self.past_grant = True
            return None
        if data and self.first_ms is None:
            self.first_ms = self.call.elapsed_ms()
        return data

    def stream_end(self, outcome: str, detail: str, status: int = 200) -> bytes:
        """The stream ended (``eof``, ``client``, ``stopped``, ``stalled``,
        ``error``, ``oversize``): recorded; the bytes to send last."""
        return self._guarded(lambda: self._stream_end(outcome, detail, status))

    def _stream_end(self, outcome: str, detail: str, status: int) -> bytes:
        server, meter, call = self.server, self.server.meter, self.call
        follower = self.follower
        if follower is None:
            follower = self.follower = StreamFollower(
                self.endpoint, drop_usage_only=not self.asked_usage
            )
        if outcome == "client" and follower.done:
            # The client left once the stream's last event was relayed (its SDK
            # stops reading there), before the upstream closed: it had it all.
            outcome = "eof"
        out = b""
        broke: str | None = None
        client_gone = outcome in ("client", "stopped")
        if outcome == "eof":
            out = follower.flush()
            if not follower.done and follower.usage is None:
                broke = "upstream stream ended before its last event"
        elif outcome == "stalled":
            broke = f"upstream stream stalled: no data for {server.config.timeout:g}s"
        elif outcome == "error":
            broke = f"upstream stream broke: {detail}"
        elif outcome == "oversize" and self.past_grant:
            broke = (
                f"upstream streamed past the {call.granted:,} output tokens granted"
                f" (cut at {follower.output_tokens():,})"
            )
        elif outcome == "oversize":
            broke = f"upstream sent an event over {_MAX_EVENT_BYTES:,} bytes"
        extra: dict[str, Any] = {"events": follower.events}
        if self.first_ms is not None:
            extra["ttft_ms"] = self.first_ms
        if follower.finish_reason is not None:
            extra["finish_reason"] = follower.finish_reason
        if client_gone or broke:
            usage = follower.usage or _estimate(self.body, follower)
            if outcome == "stopped" or (client_gone and server._stopping):
                what, category = "the proxy stopped mid-stream", "proxy_stopped"
            elif client_gone:
                what, category = "client disconnected mid-stream", "client_disconnected"
            else:
                assert broke is not None
                what, category = broke, "upstream_stream"
            meter.fail(
                call, what, category=category, status=status, usage=usage, model=follower.model
            )
            if outcome != "client":
                out += _sse_error(f"sigil proxy: {what}", "upstream_error")
        elif follower.error is not None:
            # What arrived before the error was generated: counted as a broken stream is.
            usage = follower.usage or _estimate(self.body, follower)
            meter.fail(
                call, f"upstream error in stream: {follower.error}", category="upstream_error",
                status=status, usage=usage, model=follower.model,
            )  # fmt: skip
        else:
            meter.complete(call, follower.usage, model=follower.model, status=status, extra=extra)
        return out


#: What the metered endpoints are logged as (their paths below the proxy's /v1).
_ENDPOINT_NAMES = {e.path: "/v1" + e.path for e in (CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS)}


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


def _estimate(body: dict[str, Any], follower: StreamFollower) -> Usage:
    """The tokens of a stream that broke before its usage: the prompt, as it was
    estimated to reserve it, and the text that arrived (counted as it came),
    with the offline tokenizer at a bounded cost (flagged as estimated)."""
    prompt = count_tokens(prompt_estimate_text(body))
    return Usage(prompt, follower.output_tokens(), estimated=True)
