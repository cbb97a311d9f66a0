"""What an OpenAI-compatible call cost, read from what the upstream sent.

Each endpoint reports usage its own way: chat completions and legacy
completions as ``usage.prompt_tokens``/``completion_tokens``, the Responses API
as ``usage.input_tokens``/``output_tokens`` (in the body, or in the
``response.completed`` event of a stream), embeddings as ``prompt_tokens`` only.
A count that is absent or not an integer in ``0..=2**53`` makes the usage
unknown (None): it is logged as unknown, never as 0.

A stream is followed event by event (:class:`StreamFollower`): the usage event
when it arrives, and the text that arrived, so that a stream that breaks before
its usage can still be counted (an estimate, flagged as such).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from sigil.core.limits import MAX_TOKENS
from sigil.pipeline.calls import (
    EXACT_CHARS,
    count_tokens,
    prompt_estimate_text,
    prompt_overhead,
    prompt_text,
    utf8_size,
)

__all__ = [
    "EXACT_CHARS",
    "Endpoint",
    "StreamFollower",
    "Usage",
    "count_tokens",
    "prompt_estimate_text",
    "prompt_overhead",
    "prompt_text",
    "prompt_tokens",
    "usage_of",
    "utf8_size",
]


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """The proxy's count of a request's prompt: its text (:func:`prompt_estimate_text`)
    and the chat format's tokens (:func:`prompt_overhead`)."""
    return count_tokens(prompt_estimate_text(body)) + prompt_overhead(body)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A metered route: where it forwards, which request field caps its output,
    and how it reports usage."""

    path: str  # upstream path below the base URL, e.g. "/chat/completions"
    #: request fields that cap the output, most specific first (None: no output)
    cap_fields: tuple[str, ...]
    #: usage keys (input, output); output None for embeddings
    usage_keys: tuple[str, str | None]
    #: whether the upstream must be asked for usage in a stream (stream_options)
    stream_options: bool


CHAT = Endpoint(
    "/chat/completions",
    ("max_completion_tokens", "max_tokens"),
    ("prompt_tokens", "completion_tokens"),
    True,
)
COMPLETIONS = Endpoint(
    "/completions", ("max_tokens",), ("prompt_tokens", "completion_tokens"), True
)
RESPONSES = Endpoint("/responses", ("max_output_tokens",), ("input_tokens", "output_tokens"), False)
EMBEDDINGS = Endpoint("/embeddings", (), ("prompt_tokens", None), False)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one call; ``estimated`` when counted locally from what arrived."""

    input_tokens: int
    output_tokens: int
    estimated: bool = False
    #: of the input tokens, those read from the provider's prompt cache
    cached_input_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


def _count(value: object) -> int | None:
    if type(value) is int:  # the common case, without the checks for subclasses
        return value if 0 <= value <= MAX_TOKENS else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value
    return None


def usage_of(endpoint: Endpoint, usage: object) -> Usage | None:
    """The usage object of a response (``body["usage"]``), or None when it is
    absent or holds no valid counts."""
    if type(usage) is not dict and not isinstance(usage, Mapping):
        return None
    in_key, out_key = endpoint.usage_keys
    inp = _count(usage.get(in_key))
    if out_key is None:
        if inp is None:
            inp = _count(usage.get("total_tokens"))
        return None if inp is None else Usage(inp, 0)
    out = _count(usage.get(out_key))
    if inp is not None and out is None:
        # Some servers send only the total: the output is the rest.
        total = _count(usage.get("total_tokens"))
        if total is not None and total >= inp:
            out = total - inp
    if inp is None or out is None or inp + out > MAX_TOKENS:
        return None
    return Usage(inp, out, cached_input_tokens=_cached(usage, inp))


#: Where each API reports the input tokens read from the prompt cache.
_DETAILS = ("prompt_tokens_details", "input_tokens_details")


def _cached(usage: Mapping[str, Any], inp: int) -> int:
    """The cached input tokens of a usage object (0 when absent or not a valid
    count no larger than the input)."""
    for key in _DETAILS:
        details = usage.get(key)
        if details is not None and isinstance(details, Mapping):
            cached = _count(details.get("cached_tokens"))
            if cached is not None and cached <= inp:
                return cached
    return 0


#: Characters of a stream's text kept before they are counted (~6 ms a count).
_PENDING_CHARS = 64 * 1024


@dataclass(slots=True)
class StreamFollower:
    """Reads a server-sent-event stream as it passes: the usage, the model, the
    text that arrived, and whether the stream ended properly.

    ``feed`` takes raw bytes and returns the complete events to forward (each
    with its blank line); an event carrying only the usage the client did not
    ask for is dropped, so a client that never asked sees the stream it would
    have seen without the proxy.
    """

    endpoint: Endpoint
    drop_usage_only: bool = False
    usage: Usage | None = None
    model: str | None = None
    finish_reason: str | None = None
    done: bool = False
    #: the upstream sent an error event in the stream
    error: str | None = None
    events: int = 0
    #: the text that arrived and is not counted yet (at most ~_PENDING_CHARS)
    _text: list[str] = field(default_factory=list)
    _pending: int = 0
    #: the tokens of the text counted already
    _counted: int = 0
    _buffer: bytearray = field(default_factory=bytearray)

    @property
    def text(self) -> str:
        """The text that arrived and is not counted yet: all of it while it is
        under ``_PENDING_CHARS`` characters."""
        return "".join(self._text)

    def _add_text(self, piece: str) -> None:
        """Keep a piece of the answer's text; past ``_PENDING_CHARS``, count what
        is kept and let it go, so that a long stream holds no more than that and
        is never counted again whole (each count a few milliseconds)."""
        self._text.append(piece)
        self._pending += len(piece)
        if self._pending > _PENDING_CHARS:
            self._counted += count_tokens("".join(self._text))
            self._text.clear()
            self._pending = 0

    def output_past(self, limit: int) -> bool:
        """Whether the text that arrived is past ``limit`` tokens. Free while it
        cannot be (a token is at least one UTF-8 byte and a character at most
        four); otherwise what is held is counted now and let go."""
        if self._counted + 4 * self._pending <= limit:
            return False
        if self._text:
            self._counted += count_tokens("".join(self._text))
            self._text.clear()
            self._pending = 0
        return self._counted > limit

    def output_tokens(self) -> int:
        """The tokens of the text that arrived (``cl100k_base``; an estimate for
        a stream that ended before its usage)."""
        if not self._text:
            return self._counted
        return self._counted + count_tokens(self.text)

    @property
    def pending(self) -> int:
        """Bytes of an event not complete yet."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> bytes:
        buf = self._buffer
        buf += chunk
        out = bytearray()
        start = self._events_in(buf, out)
        del buf[:start]
        return bytes(out)

    def _events_in(self, buf: bytearray, out: bytearray) -> int:
        """Read the complete events of ``buf``, appending those to forward to
        ``out``; returns where the incomplete rest begins."""
        start = 0
        while True:
            end, sep = _event_end(buf, start)
            if end < 0:
                return start
            if self._read_event(bytes(buf[start:end])):
                out += buf[start : end + sep]
            start = end + sep

    def flush(self) -> bytes:
        """The events still held when the stream ended: those whose last line end
        is a CR at the very end (no LF can follow it now), and the last event
        when the stream ended without its blank line."""
        out = bytearray()
        if b"\r" in self._buffer:
            # A byte that ends no line: a CR before it is a line end of its own.
            start = self._events_in(self._buffer + b"\x00", out)
            del self._buffer[:start]
        rest, self._buffer = bytes(self._buffer), bytearray()
        if rest.strip() and self._read_event(rest):
            out += rest + b"\n\n"
        return bytes(out)

    def _read_event(self, event: bytes) -> bool:
        """Read one event; returns whether to forward it."""
        self.events += 1
        data: bytes | bytearray
        if b"\n" not in event and b"\r" not in event:
            # One line (the common case: each event one ``data:`` line)
            if event.startswith(b"data:"):
                data = event[6:] if event.startswith(b"data: ") else event[5:]
            else:
                data = b""
        else:
            data = bytearray()
            for line in event.splitlines():
                if line.startswith(b"data:"):
                    piece = line[5:]
                    if piece.startswith(b" "):
                        piece = piece[1:]
                    if data:
                        data += b"\n"
                    data += piece
        if not data:
            return True
        if data.strip() == b"[DONE]":
            self.done = True
            return True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, dict):
            return True
        if self.endpoint is RESPONSES:
            return self._responses_event(obj)
        return self._chat_event(obj)

    def _chat_event(self, obj: dict[str, Any]) -> bool:
        err = obj.get("error")
        if err is not None:
            self.error = _error_text(err)
        if isinstance(obj.get("model"), str):
            self.model = obj["model"]
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                if isinstance(choice.get("finish_reason"), str):
                    self.finish_reason = choice["finish_reason"]
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    self._take_text(delta)
                elif isinstance(choice.get("text"), str):  # legacy completions
                    self._add_text(choice["text"])
        usage = usage_of(self.endpoint, obj.get("usage"))
        if usage is not None:
            self.usage = usage
            if self.drop_usage_only and not choices:
                return False
        return True

    def _take_text(self, delta: dict[str, Any]) -> None:
        for key in ("content", "refusal", "reasoning_content"):
            if isinstance(delta.get(key), str):
                self._add_text(delta[key])
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    for key in ("name", "arguments"):
                        if isinstance(fn.get(key), str):
                            self._add_text(fn[key])

    def _responses_event(self, obj: dict[str, Any]) -> bool:
        kind = obj.get("type")
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self.done = True
            response = obj.get("response")
            if isinstance(response, dict):
                self.usage = usage_of(RESPONSES, response.get("usage")) or self.usage
                if isinstance(response.get("model"), str):
                    self.model = response["model"]
                if kind == "response.failed":
                    self.error = _error_text(response.get("error")) or "response failed"
        elif kind == "error":
            self.error = _error_text(obj) or "error event"
        elif (
            isinstance(kind, str) and kind.endswith(".delta") and isinstance(obj.get("delta"), str)
        ):
            self._add_text(obj["delta"])
        elif kind == "response.created":
            response = obj.get("response")
            if isinstance(response, dict) and isinstance(response.get("model"), str):
                self.model = response["model"]
        return True


def _event_end(buf: bytearray, start: int) -> tuple[int, int]:
    """Where the next event ends and the length of what ends it (its last line's
    end and the blank line's), or ``(-1, 0)`` while it is not complete.

    A line ends with CRLF, LF or a bare CR (the SSE spec allows all three, mixed);
    a CR at the end of ``buf`` waits for the next byte, which may be its LF."""
    if buf.find(b"\r", start) < 0:  # the common case: LF line ends only
        lf = buf.find(b"\n\n", start)
        return (lf, 2) if lf >= 0 else (-1, 0)
    size = len(buf)
    line = start  # where the current line begins
    pos = start
    while True:
        cr = buf.find(b"\r", pos)
        lf = buf.find(b"\n", pos)
        at = cr if lf < 0 or (0 <= cr < lf) else lf
        if at < 0:
            return -1, 0
        if buf[at] == 0x0D:  # CR
            if at + 1 >= size:
                return -1, 0
            after = at + 2 if buf[at + 1] == 0x0A else at + 1
        else:
            after = at + 1
        if at == line:  # an empty line: the event ends
            end = start if line == start else _line_end(buf, start, line)
            return end, after - end
        line = pos = after


def _line_end(buf: bytearray, start: int, line: int) -> int:
    """Where the line before the one beginning at ``line`` ends (its CR or LF)."""
    end = line - 1
    if buf[end] == 0x0A and end > start and buf[end - 1] == 0x0D:
        end -= 1
    return end


def _error_text(err: object) -> str | None:
    if isinstance(err, dict):
        inner = err.get("error", err)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"][:500]
        if isinstance(err.get("message"), str):
            return err["message"][:500]
        return "error"
    if isinstance(err, str):
        return err[:500]
    return None
