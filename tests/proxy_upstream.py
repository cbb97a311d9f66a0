"""A small OpenAI-compatible model server on 127.0.0.1 for the proxy's tests and bench.

It answers chat completions (streamed and not), legacy completions, the
Responses API, embeddings and models, and records every request and the usage
it reported, so a test can check the log against exactly what the upstream
said. The model name picks a misbehaviour:

* ``broken``: a stream that stops mid-way (the connection is cut);
* ``nousage``: no ``usage`` anywhere (and none in a stream);
* ``invalid``: a 200 whose body is not JSON;
* ``slow``: answers after ``slow_seconds``;
* ``fail500``: HTTP 500 with an OpenAI-shaped error;
* ``quota429``: HTTP 429 ``insufficient_quota`` without ``x-should-retry``;
* ``ncount``: every completion (``n`` choices, each prompt of a legacy
  completions list) runs to its cap, read from ``max_tokens`` first as some
  servers do (``max_completion_tokens`` when absent);
* ``echokey``: HTTP 401 whose message quotes the key it was sent, whole;
* ``streamerror``: a stream that sends part of its answer, then an ``error``
  event (no usage), then ``[DONE]``;
* ``crsep``: a stream whose lines and events end with a bare CR (``\r``).

``bytes_per_token`` bills every prompt at one token per that many bytes of
the request's body (a tokenizer that is not ``cl100k_base``: at 4, about 10%
more tokens than it for JSON and English).

And one model plays an agent's model:

* ``agent``: while the request offers ``tools`` and holds no tool result yet,
  it calls the first tool with ``tool_arguments``; then it answers
  ``answer: `` followed by the last tool result's text. Chat completions and
  the Responses API, streamed and not.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Reported:
    endpoint: str
    model: str
    input_tokens: int
    output_tokens: int


@dataclass
class Upstream:
    """Runs in its own thread and event loop; ``url`` is its API root."""

    slow_seconds: float = 5.0
    #: content pieces of a stream
    pieces: int = 5
    delay: float = 0.0
    #: seconds between the pieces of a stream (default: ``delay``)
    piece_delay: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    reported: list[Reported] = field(default_factory=list)
    url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    record: bool = True
    #: the arguments the ``agent`` model calls its first tool with
    tool_arguments: dict[str, Any] = field(default_factory=dict)
    #: the model name answered for a requested one (default: ``NAME-2026``)
    answer_as: dict[str, str] = field(default_factory=dict)
    #: input tokens reported as read from the prompt cache (at most the input)
    cached_tokens: int = 0
    #: serve HTTPS (on ``localhost``) with this context
    ssl_context: Any = None
    #: seconds a stream stays open after its ``[DONE]`` (as LiteLLM's does)
    linger: float = 0.0
    #: pieces the ``runaway`` model streamed (it ignores every cap and streams
    #: until its client leaves)
    runaway_pieces: int = 0
    #: bill each prompt at one token per this many bytes of the request's body
    #: (0: the default count)
    bytes_per_token: int = 0

    # -- life ----------------------------------------------------------------------

    def start(self) -> Upstream:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._serve())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())  # type: ignore[union-attr]
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024, ssl_context=self.ssl_context)
        await site.start()
        port = self._runner.addresses[0][1]
        if self.ssl_context is not None:
            self.url = f"https://localhost:{port}/v1"
        else:
            self.url = f"http://127.0.0.1:{port}/v1"

    # -- helpers ---------------------------------------------------------------------

    def _note(self, request: web.Request, body: dict[str, Any]) -> None:
        if self.record:
            with self._lock:
                self.requests.append(body)
                self.headers.append(dict(request.headers))

    def _report(self, endpoint: str, model: str, inp: int, out: int) -> None:
        if self.record:
            with self._lock:
                self.reported.append(Reported(endpoint, model, inp, out))

    def _answered(self, model: str) -> str:
        return self.answer_as.get(model, f"{model}-2026")

    def _details(self, key: str, inp: int) -> dict[str, Any]:
        """The usage's cached-token details, when the upstream reports a cache hit."""
        if not self.cached_tokens:
            return {}
        return {key: {"cached_tokens": min(self.cached_tokens, inp)}}

    def totals(self) -> int:
        with self._lock:
            return sum(r.input_tokens + r.output_tokens for r in self.reported)

    async def _billed(self, request: web.Request, body: dict[str, Any]) -> int:
        """The prompt tokens of a request: :attr:`bytes_per_token`'s count when set."""
        if self.bytes_per_token:
            return len(await request.read()) // self.bytes_per_token
        return self._prompt_tokens(body)

    @staticmethod
    def _prompt_tokens(body: dict[str, Any]) -> int:
        text = orjson.dumps(body.get("messages") or body.get("input") or body.get("prompt"))
        return 7 + len(text) % 41

    def _agent_turn(self, body: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
        """The ``agent`` model's turn: (text, None) or (None, a tool call)."""
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        results = [m for m in messages if m.get("role") == "tool"]
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        if tools and not results:
            name = tools[0]["function"]["name"]
            arguments = orjson.dumps(self.tool_arguments).decode()
            call = {"id": "call_1", "type": "function",
                    "function": {"name": name, "arguments": arguments}}  # fmt: skip
            return None, call
        content = results[-1].get("content") if results else ""
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return f"answer: {content}", None

    def _agent_turn_responses(
        self, body: dict[str, Any]
    ) -> tuple[str | None, dict[str, Any] | None]:
        """:meth:`_agent_turn` for the Responses API: a ``function_call`` item."""
        items = body.get("input")
        items = [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
        results = [i for i in items if i.get("type") == "function_call_output"]
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        if tools and not results:
            call = {"type": "function_call", "id": "fc_1", "call_id": "call_1",
                    "name": tools[0]["name"], "status": "completed",
                    "arguments": orjson.dumps(self.tool_arguments).decode()}  # fmt: skip
            return None, call
        content = results[-1].get("output") if results else ""
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return f"answer: {content}", None

    @staticmethod
    def _cap(body: dict[str, Any], *names: str) -> int:
        caps = [body[n] for n in names if isinstance(body.get(n), int)]
        return min(caps) if caps else 1000

    # -- routes ----------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self._note(request, body)
        model = body.get("model", "m")
        legacy = request.path.endswith("/v1/completions")
        if self.delay:
            await asyncio.sleep(self.delay)
        if model == "slow":
            await asyncio.sleep(self.slow_seconds)
        if model == "fail500":
            return web.json_response(
                {"error": {"message": "upstream exploded", "type": "server_error"}}, status=500
            )
        if model == "quota429":
            body = {"error": {"message": "quota", "type": "insufficient_quota"}}
            return web.json_response(body, status=429, headers={"retry-after-ms": "1"})
        if model == "invalid":
            return web.Response(text="<html>oops</html>", content_type="application/json")
        if model == "echokey":
            key = request.headers.get("Authorization", "").removeprefix("Bearer ")
            key = request.headers.get("api-key", key)  # Azure's header
            err = {"message": f"Invalid API key: {key}", "type": "invalid_request_error",
                   "code": "invalid_api_key"}  # fmt: skip
            return web.json_response({"error": err}, status=401)
        if model == "ncount":
            return self._ncount(request, body, legacy)
        inp = await self._billed(request, body)
        out = min(self.pieces, self._cap(body, "max_tokens", "max_completion_tokens"))
        if model == "runaway":
            out = 10**9
        turn = self._agent_turn(body) if model == "agent" and not legacy else None
        if body.get("stream"):
            return await self._chat_stream(request, body, model, inp, out, legacy, turn)
        message: dict[str, Any] = {"role": "assistant", "content": "w " * out}
        finish = "stop"
        if turn is not None:
            text, call = turn
            message = {"role": "assistant", "content": text}
            if call is not None:
                message["tool_calls"] = [call]
                finish = "tool_calls"
        data: dict[str, Any] = {
            "id": "chatcmpl-1",
            "object": "text_completion" if legacy else "chat.completion",
            "created": int(time.time()),
            "model": self._answered(model),
            "choices": [
                {"index": 0, "text": "w " * out, "finish_reason": "stop"}
                if legacy
                else {"index": 0, "message": message, "finish_reason": finish}
            ],
        }
        if model != "nousage":
            data["usage"] = {
                "prompt_tokens": inp,
                "completion_tokens": out,
                "total_tokens": inp + out,
                **self._details("prompt_tokens_details", inp),
            }
            self._report(request.path, model, inp, out)
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    def _ncount(self, request: web.Request, body: dict[str, Any], legacy: bool) -> web.Response:
        """The ``ncount`` model: each completion spends its whole cap."""
        cap = body.get("max_tokens")
        if not isinstance(cap, int):
            cap = self._cap(body, "max_completion_tokens")
        prompt = body.get("prompt")
        prompts = len(prompt) if legacy and isinstance(prompt, list) else 1
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        completions = n * prompts
        inp = self._prompt_tokens(body)
        out = cap * completions
        choices = [
            {"index": i, "text": "w " * cap, "finish_reason": "length"}
            if legacy
            else {
                "index": i,
                "message": {"role": "assistant", "content": "w " * cap},
                "finish_reason": "length",
            }
            for i in range(completions)
        ]
        data = {
            "id": "n1",
            "object": "text_completion" if legacy else "chat.completion",
            "created": 1,
            "model": "ncount",
            "choices": choices,
            "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out},
        }
        self._report(request.path, "ncount", inp, out)
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    async def _chat_stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: str,
        inp: int,
        out: int,
        legacy: bool,
        turn: tuple[str | None, dict[str, Any] | None] | None = None,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        include = (body.get("stream_options") or {}).get("include_usage") is True

        def chunk(delta: dict[str, Any] | None, finish: str | None = None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if legacy:
                choice["text"] = (delta or {}).get("content", "")
            else:
                choice["delta"] = delta or {}
            data: dict[str, Any] = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": self._answered(model),
                "choices": [choice],
            }
            if include:
                data["usage"] = None
            return b"data: " + orjson.dumps(data) + b"\n\n"

        await resp.write(chunk({"role": "assistant", "content": ""}))
        if model == "streamerror":
            for _ in range(out):
                await resp.write(chunk({"content": "hello world "}))
            error = {"error": {"message": "overloaded mid-stream", "type": "server_error"}}
            await resp.write(b"data: " + orjson.dumps(error) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        if model == "crsep":
            return await self._cr_stream(request, resp, chunk, model, inp, out, include)
        if turn is not None:
            await self._agent_stream(resp, chunk, turn)
        for i in range(out if turn is None else 0):
            try:
                await resp.write(chunk({"content": "word "}))
            except ConnectionResetError:  # the runaway's client left
                return resp
            if model == "runaway":
                self.runaway_pieces += 1
                if i % 64 == 0:
                    await asyncio.sleep(0)  # lets the loop see the client leave
            if model == "broken" and i == out // 2:
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.close()
                return resp
            if self.piece_delay or self.delay:
                await asyncio.sleep(self.piece_delay or self.delay)
        finish = "tool_calls" if turn is not None and turn[1] is not None else "stop"
        await resp.write(chunk({}, finish))
        if include and model != "nousage":
            usage = {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out,
                     **self._details("prompt_tokens_details", inp)}  # fmt: skip
            data = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": self._answered(model),
                "choices": [],
                "usage": usage,
            }
            await resp.write(b"data: " + orjson.dumps(data) + b"\n\n")
            self._report(request.path, model, inp, out)
        await resp.write(b"data: [DONE]\n\n")
        if self.linger:
            await asyncio.sleep(self.linger)
        await resp.write_eof()
        return resp

    async def _cr_stream(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        chunk: Any,
        model: str,
        inp: int,
        out: int,
        include: bool,
    ) -> web.StreamResponse:
        """The ``crsep`` model's stream: every line ends with a bare CR (the SSE
        spec allows CR, LF and CRLF), an event with a comment line among its own."""

        def cr(event: bytes) -> bytes:
            return event.replace(b"\n", b"\r")

        for _ in range(out):
            await resp.write(cr(chunk({"content": "word "})))
        await resp.write(cr(b": a comment\n" + chunk({}, "stop")))
        if include:
            usage = {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}
            data = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                    "model": self._answered(model), "choices": [], "usage": usage}  # fmt: skip
            await resp.write(b"data: " + orjson.dumps(data) + b"\r\r")
            self._report(request.path, model, inp, out)
        await resp.write(b"data: [DONE]\r\r")
        await resp.write_eof()
        return resp

    @staticmethod
    async def _agent_stream(
        resp: web.StreamResponse,
        chunk: Any,
        turn: tuple[str | None, dict[str, Any] | None],
    ) -> None:
        """The ``agent`` model's turn as stream deltas: its text in pieces, or a
        tool call whose arguments arrive in two pieces."""
        text, call = turn
        if call is None:
            assert text is not None
            for i in range(0, len(text), 8):
                await resp.write(chunk({"content": text[i : i + 8]}))
            return
        fn = call["function"]
        head = {"index": 0, "id": call["id"], "type": "function",
                "function": {"name": fn["name"], "arguments": ""}}  # fmt: skip
        await resp.write(chunk({"tool_calls": [head]}))
        half = len(fn["arguments"]) // 2
        for piece in (fn["arguments"][:half], fn["arguments"][half:]):
            delta = {"index": 0, "function": {"arguments": piece}}
            await resp.write(chunk({"tool_calls": [delta]}))

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self._note(request, body)
        model = body.get("model", "m")
        inp = await self._billed(request, body)
        out = min(self.pieces, self._cap(body, "max_output_tokens"))
        usage = {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
                 **self._details("input_tokens_details", inp)}  # fmt: skip
        text: str | None = "w " * out
        call: dict[str, Any] | None = None
        if model == "agent":
            text, call = self._agent_turn_responses(body)
        item = call or {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        response = {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "status": "completed",
            "model": self._answered(model),
            "output": [item],
            "usage": usage,
        }
        self._report(request.path, model, inp, out)
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(response), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        seq = 0

        async def event(kind: str, data: dict[str, Any]) -> None:
            nonlocal seq
            data = {"type": kind, "sequence_number": seq, **data}
            seq += 1
            await resp.write(f"event: {kind}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n")

        created = {**response, "status": "in_progress", "usage": None, "output": []}
        await event("response.created", {"response": created})
        if call is not None:
            at = {"item_id": call["id"], "output_index": 0}
            await event("response.output_item.added",
                        {"output_index": 0, "item": {**call, "arguments": ""}})  # fmt: skip
            half = len(call["arguments"]) // 2
            for piece in (call["arguments"][:half], call["arguments"][half:]):
                await event("response.function_call_arguments.delta", {**at, "delta": piece})
            await event("response.function_call_arguments.done",
                        {**at, "arguments": call["arguments"]})  # fmt: skip
            await event("response.output_item.done", {"output_index": 0, "item": call})
        else:
            assert text is not None
            step = 2 if model != "agent" else 8  # the "w " pieces of other models
            for i in range(0, len(text), step):
                await event(
                    "response.output_text.delta",
                    {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                     "delta": text[i : i + step]},
                )  # fmt: skip
        await event("response.completed", {"response": response})
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._note(request, body)
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        inp = 3 * len(items)
        self._report(request.path, body.get("model", "m"), inp, 0)
        data = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                for i in range(len(items))
            ],
            "model": body.get("model", "m"),
            "usage": {"prompt_tokens": inp, "total_tokens": inp},
        }
        return web.json_response(data)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "m", "object": "model", "created": 1, "owned_by": "t"}],
            }
        )
