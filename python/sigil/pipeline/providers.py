"""Model providers: an OpenAI-compatible chat-completions client.

One client covers OpenAI, vLLM, Ollama, llama.cpp's server and LiteLLM's proxy:
they all speak ``POST {base_url}/chat/completions``. It uses ``httpx``'s async
client on the event loop itself, so an in-flight call is cancellable (a signal
cancels the run's task and the call with it; no worker thread is left blocked in a
read), and ``timeout`` is one deadline for the whole call (connect, send, wait and
read the body), not a per-read timeout a slow drip of bytes can stretch forever.
Redirects are never followed: the API key goes only to ``base_url``, and a 3xx is
a configuration error naming the server. Credentials in ``base_url`` are refused.
Token counts come from the response's ``usage``; a server that omits it (some
local servers do) gets its tokens counted with the offline tokenizer and the
completion says so (``usage_estimated``).

Failures are classified for :class:`~sigil.core.error_handling.ErrorHandler`
through the ``category`` attribute of the exceptions:

* 429, 5xx, timeouts, refused or reset connections: **transient** (retried), with
  the ``Retry-After`` header (seconds or an HTTP date) as ``retry_after``;
* 3xx (a redirect), 401 and 403: **config** (a missing or wrong key: abort with a message), 404 too
  (a wrong base URL or model name);
* other 4xx: **logic** (the request itself is wrong);
* a 2xx whose body is not a chat completion: **transient** (proxies sometimes
  return an HTML error page with 200); if the body still reported ``usage``, those
  tokens travel on the exception so they are counted. A ``usage`` whose counts are
  not integers in ``0..=2**53`` is such an invalid body (its tokens are unknown).

The API key never leaves the provider in a text: servers echo it in their errors
(``Incorrect API key provided: <key>``, whole or masked), so every exception
message and every answer's content goes through :func:`redact_key` first (the
one :func:`~sigil.pipeline.calls.redact` the proxy uses too, with the key and
the parts of it the text holds).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import os
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from sigil.pipeline.base import StepBudgetError, StepError, TokenUsage
from sigil.pipeline.calls import (
    DEFAULT_CALL_CAP,
    chat_cap_field,
    count_tokens,
    prompt_estimate_text,
    prompt_overhead,
    redact,
)

if TYPE_CHECKING:  # pragma: no cover
    from sigil.core.config import Settings

__all__ = [
    "ChatCompletion",
    "ChatProvider",
    "OpenAIChatProvider",
    "ProviderAuthError",
    "ProviderConfigError",
    "ProviderError",
    "ProviderRequestError",
    "ProviderResponseError",
    "ProviderTransientError",
    "output_cap",
    "parse_retry_after",
    "redact_key",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_MAX_BODY = 16 * 1024 * 1024  # a chat completion is far smaller; refuse to buffer more
_MAX_ERROR_BODY = 64 * 1024  # an error body only feeds a short snippet
MAX_TOKENS = 2**53  # the largest count every reader (JSON doubles included) holds exactly
_SNIPPET = 200


@dataclass(frozen=True, slots=True)
class ChatCompletion:
    """One completion with its cost."""

    content: str
    input_tokens: int
    output_tokens: int
    model: str
    finish_reason: str | None = None
    usage_estimated: bool = False
    latency_ms: float = 0.0

    @property
    def usage(self) -> TokenUsage:
        return TokenUsage(self.input_tokens, self.output_tokens, self.model)


class ChatProvider(Protocol):
    """What a step needs from a model."""

    name: str
    model: str

    async def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        json_mode: bool = False,
    ) -> ChatCompletion: ...


class ProviderError(StepError):
    """A provider call failed. ``status`` is the HTTP status when there was one."""

    category = "transient"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        usage: TokenUsage | None = None,
    ) -> None:
        super().__init__(message, usage=usage, retry_after=retry_after)
        self.status = status


class ProviderTransientError(ProviderError):
    """429, 5xx, timeout or connection failure: worth retrying."""

    category = "transient"


class ProviderConfigError(ProviderError):
    """The configuration is wrong (key, base URL, model); retrying will not help."""

    category = "config"


class ProviderAuthError(ProviderConfigError):
    """401/403/404: the key, base URL or model is wrong."""


class ProviderRedirectError(ProviderConfigError):
    """The server redirected: the key is never sent on to another URL."""


class ProviderRequestError(ProviderError):
    """Another 4xx: the request itself was rejected."""

    category = "logic"


class ProviderResponseError(ProviderError):
    """A 2xx whose body is not a usable chat completion."""

    category = "transient"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        current = datetime.fromtimestamp(now if now is not None else time.time(), UTC)
        seconds = (when - current).total_seconds()
    return max(0.0, seconds) if seconds == seconds else None  # NaN guard


class OpenAIChatProvider:
    """``POST {base_url}/chat/completions`` with the standard library, off the event loop."""

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str = DEFAULT_BASE_URL,
        model: str = "gpt-4o-mini",
        api_key: str | None = None,
        timeout: float = 60.0,
        token_counter: Any = None,
    ) -> None:
        """
        Args:
            base_url: the API root, e.g. ``http://127.0.0.1:11434/v1`` for Ollama.
            model: model name sent in each request.
            api_key: sent as ``Authorization: Bearer``; None for servers without auth.
            timeout: seconds for the whole call: connect, send, wait, read the body.
            token_counter: object with ``count(text) -> int`` used when a server
                omits ``usage`` (default: the offline ``cl100k_base`` tokenizer).
        """
        parts = urllib.parse.urlsplit(base_url)
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            # Never echoed: the message would carry the password to the terminal.
            raise ValueError(
                "provider.base_url must not contain credentials (user:password@); "
                "put the key in the variable named by provider.api_key_env"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"provider base URL must start with http:// or https://: {_safe_url(base_url)}"
            )
        if timeout <= 0:
            raise ValueError("provider timeout must be > 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self.timeout = float(timeout)
        self._token_counter = token_counter

    @classmethod
    def from_settings(
        cls, settings: Settings, env: Mapping[str, str] | None = None
    ) -> OpenAIChatProvider:
        """Base URL, model and timeout from ``settings.provider``; the key from the
        environment variable it names (``OPENAI_API_KEY`` by default)."""
        env = os.environ if env is None else env
        p = settings.provider
        return cls(
            base_url=p.base_url,
            model=p.model,
            api_key=env.get(p.api_key_env) or None,
            timeout=p.timeout_seconds,
        )

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChatProvider(base_url={self.base_url!r}, model={self.model!r})"

    async def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        json_mode: bool = False,
    ) -> ChatCompletion:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in messages],
            "temperature": temperature,
        }
        if max_tokens is not None:
            payload[self._cap_field()] = max_tokens
        if json_mode:
            payload["response_format"] = {"type": "json_object"}
        body = json.dumps(payload).encode()
        started = time.perf_counter()
        try:
            try:
                # One deadline for the whole call; httpx's own timeouts are per phase.
                async with asyncio.timeout(self.timeout):
                    status, headers, raw = await self._post(body)
            except TimeoutError:
                raise self._timed_out() from None
            latency_ms = (time.perf_counter() - started) * 1000
            completion = self._parse(status, headers, raw, messages, latency_ms)
        except ProviderError as exc:
            # A server may echo the key in its error: cut it before anyone logs it.
            if self._api_key:
                exc.args = tuple(
                    redact_key(a, self._api_key) if isinstance(a, str) else a for a in exc.args
                )
            raise
        if self._api_key:
            content = redact_key(completion.content, self._api_key, whole_only=True)
            if content is not completion.content:
                completion = dataclasses.replace(completion, content=content)
        return completion

    def _cap_field(self) -> str:
        """The field an output cap goes in, as the proxy picks it (``max_completion_tokens``
        for OpenAI's and Azure's hosts, whose reasoning models refuse ``max_tokens``;
        ``max_tokens``, which every OpenAI-compatible server knows, elsewhere)."""
        return chat_cap_field(self.base_url)

    # -- transport -----------------------------------------------------------------------

    async def _post(self, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        import httpx  # lazy: only runs that use a model pay for the import

        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "sigil",
        }
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = f"{self.base_url}/chat/completions"
        try:
            async with (
                httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client,
                client.stream("POST", url, content=body, headers=headers) as response,
            ):
                status = response.status_code
                if 300 <= status < 400:
                    raise self._redirect(status, response.headers.get("location"))
                if status >= 400:
                    raw = await _read_bounded(response, _MAX_ERROR_BODY, truncate=True)
                    raise self._http_error(status, dict(response.headers), raw)
                return status, dict(response.headers), await _read_bounded(response, _MAX_BODY)
        except httpx.TimeoutException:
            raise self._timed_out() from None
        except httpx.ConnectError as exc:
            raise ProviderTransientError(f"{self._where()} unreachable: {exc}") from None
        except httpx.TransportError as exc:
            raise ProviderTransientError(f"{self._where()} connection failed: {exc}") from None
        except httpx.DecodingError as exc:
            raise ProviderResponseError(
                f"{self._where()} sent a body that does not decode: {exc}"
            ) from None

    def _timed_out(self) -> ProviderTransientError:
        return ProviderTransientError(f"{self._where()} timed out after {self.timeout:g}s")

    def _redirect(self, status: int, location: str | None) -> ProviderRedirectError:
        target = (
            f" to {_safe_url(urllib.parse.urljoin(self.base_url + '/', location))}"
            if location
            else ""
        )
        return ProviderRedirectError(
            f"{self._where()} answered HTTP {status}, a redirect{target}; sigil never follows "
            "redirects (the API key would go with it): set provider.base_url to the URL "
            "that answers",
            status=status,
        )

    def _where(self) -> str:
        return f"model server {self.base_url}"

    def _http_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ProviderError:
        detail = _error_detail(raw)
        text = f"{self._where()} answered HTTP {status}" + (f": {detail}" if detail else "")
        lowered = {k.lower(): v for k, v in headers.items()}
        if status == 429 or status >= 500 or status == 408:
            return ProviderTransientError(
                text,
                status=status,
                retry_after=parse_retry_after(lowered.get("retry-after")),
            )
        if status in (401, 403):
            return ProviderAuthError(
                f"{text} (check the API key in the provider's api_key_env variable)",
                status=status,
            )
        if status == 404:
            return ProviderAuthError(
                f"{text} (check provider.base_url and provider.model)", status=status
            )
        return ProviderRequestError(text, status=status)

    # -- response ----------------------------------------------------------------------

    def _parse(
        self,
        status: int,
        headers: Mapping[str, str],
        raw: bytes,
        messages: Sequence[Mapping[str, str]],
        latency_ms: float,
    ) -> ChatCompletion:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ProviderResponseError(
                f"{self._where()} returned a body that is not JSON: {_snippet(raw)!r}",
                status=status,
            ) from None
        if not isinstance(data, dict):
            raise ProviderResponseError(
                f"{self._where()} returned JSON that is not an object", status=status
            )
        try:
            usage = _usage_of(data)
        except _InvalidUsage as exc:
            raise ProviderResponseError(
                f"{self._where()} returned an invalid usage: {exc}", status=status
            ) from None
        answered = data.get("model")
        model = answered if isinstance(answered, str) else self.model
        try:
            choice = data["choices"][0]
            content = choice["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("content is not a string")
        except (KeyError, IndexError, TypeError) as exc:
            raise ProviderResponseError(
                f"{self._where()} returned no message content ({exc})",
                status=status,
                usage=TokenUsage(usage[0], usage[1], model) if usage else None,
            ) from None
        finish = choice.get("finish_reason") if isinstance(choice, dict) else None
        if usage is None:
            counter = self._token_counter or _default_counter()
            prompt = "\n".join(str(m.get("content", "")) for m in messages)
            usage, estimated = (counter.count(prompt), counter.count(content)), True
        else:
            estimated = False
        return ChatCompletion(
            content=content,
            input_tokens=usage[0],
            output_tokens=usage[1],
            model=model,
            finish_reason=finish if isinstance(finish, str) else None,
            usage_estimated=estimated,
            latency_ms=latency_ms,
        )


async def _read_bounded(response: Any, limit: int, *, truncate: bool = False) -> bytes:
    """The body, decoded, at most ``limit`` bytes (past it: cut, or an error)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if truncate:
                break
            raise ProviderResponseError(f"response body larger than {limit} bytes")
    return b"".join(chunks)[:limit]


def _safe_url(url: str) -> str:
    """``url`` without credentials, query or fragment: fit for a message."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    return urllib.parse.urlunsplit((parts.scheme, host + port, parts.path, "", ""))


class _InvalidUsage(ValueError):
    """``usage`` holds a count that is not an integer in ``0..=MAX_TOKENS``."""


def _usage_of(data: Mapping[str, Any]) -> tuple[int, int] | None:
    """(input, output) from ``usage``; None when it is absent (estimate locally).

    Raises _InvalidUsage for a count that is present but not a token count: such
    an answer is as broken as one without content, and its tokens are unknown."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(key)
        if value is not None and not _is_count(value):
            raise _InvalidUsage(f"usage.{key} = {str(value)[:40]} is not a token count (0..2**53)")
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    total = usage.get("total_tokens")
    if prompt is not None and completion is None and total is not None and total >= prompt:
        completion = total - prompt
    if prompt is None or completion is None:
        return None
    if prompt + completion > MAX_TOKENS:
        raise _InvalidUsage(f"usage totals {prompt} + {completion} tokens, more than 2**53")
    return int(prompt), int(completion)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS


def _error_detail(raw: bytes) -> str:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _snippet(raw)
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:_SNIPPET]
        if isinstance(err, str):
            return err[:_SNIPPET]
    return _snippet(raw)


def _snippet(raw: bytes) -> str:
    return raw[:_SNIPPET].decode("utf-8", "replace").strip()


# -- the budget of a call ---------------------------------------------------------------


def output_cap(
    messages: Sequence[Mapping[str, str]], tokens_remaining: int, *, json_mode: bool = False
) -> int:
    """The ``max_tokens`` of a chat call made with ``tokens_remaining`` of the budget
    left: what is left once the prompt is counted, as the proxy counts it
    (:mod:`sigil.pipeline.calls`: the text with ``cl100k_base`` and the chat format's
    tokens per message), at most the proxy's cap of a call that sets none (a model
    refuses a ``max_tokens`` above its own limit). Raises :class:`StepBudgetError`
    when the prompt leaves nothing: the call is not sent."""
    body: dict[str, Any] = {"messages": [dict(m) for m in messages]}
    if json_mode:
        body["response_format"] = {"type": "json_object"}
    prompt = count_tokens(prompt_estimate_text(body)) + prompt_overhead(body)
    left = tokens_remaining - prompt
    if left <= 0:
        raise StepBudgetError(
            f"token budget: {max(0, tokens_remaining):,} tokens left and the prompt alone "
            f"takes {prompt:,}: the model call was not sent"
        )
    return min(left, DEFAULT_CALL_CAP)


# -- the key in texts ---------------------------------------------------------------------


def redact_key(text: str, key: str, *, whole_only: bool = False) -> str:
    """``text`` without ``key``: :func:`~sigil.pipeline.calls.redact`, the proxy's
    rule too (the key, the ``Bearer`` header whole, any run of
    :data:`~sigil.pipeline.calls.KEY_RUN` or more of its characters, a masked form
    of it, and a text ending with its first 6+ characters). ``whole_only``: a
    model's answer, never cut short, is not searched for a cut-off start; it comes
    back itself when it holds no piece of the key."""
    return redact(text, (key,), cut_off=not whole_only)


def _default_counter() -> Any:
    from sigil.pipeline.tokenizer import get_tokenizer

    return get_tokenizer()
