"""Model providers: an OpenAI-compatible chat-completions client.

One client covers OpenAI, vLLM, Ollama, llama.cpp's server and LiteLLM's proxy:
they all speak ``POST {base_url}/chat/completions``. It uses only the standard
library (``urllib``), run in a worker thread so the event loop never blocks on the
network. Token counts come from the response's ``usage``; a server that omits it
(some local servers do) gets its tokens counted with the offline tokenizer and the
completion says so (``usage_estimated``).

Failures are classified for :class:`~sigil.core.error_handling.ErrorHandler`
through the ``category`` attribute of the exceptions:

* 429, 5xx, timeouts, refused or reset connections: **transient** (retried), with
  the ``Retry-After`` header (seconds or an HTTP date) as ``retry_after``;
* 401 and 403: **config** (a missing or wrong key: abort with a message), 404 too
  (a wrong base URL or model name);
* other 4xx: **logic** (the request itself is wrong);
* a 2xx whose body is not a chat completion: **transient** (proxies sometimes
  return an HTML error page with 200); if the body still reported ``usage``, those
  tokens travel on the exception so they are counted.
"""

from __future__ import annotations

import asyncio
import email.utils
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from sigil.pipeline.base import StepError, TokenUsage

if TYPE_CHECKING:  # pragma: no cover
    from sigil.core.config import Settings

__all__ = [
    "ChatCompletion",
    "ChatProvider",
    "OpenAIChatProvider",
    "ProviderAuthError",
    "ProviderError",
    "ProviderRequestError",
    "ProviderResponseError",
    "ProviderTransientError",
    "parse_retry_after",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_MAX_BODY = 16 * 1024 * 1024  # a chat completion is far smaller; refuse to buffer more
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


class ProviderAuthError(ProviderError):
    """401/403/404: the key, base URL or model is wrong; retrying will not help."""

    category = "config"


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
            timeout: seconds for connecting and for each read of the response.
            token_counter: object with ``count(text) -> int`` used when a server
                omits ``usage`` (default: the offline ``cl100k_base`` tokenizer).
        """
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"provider base URL must start with http:// or https://: {base_url}")
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

    @property
    def has_api_key(self) -> bool:
        return bool(self._api_key)

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
            payload["max_tokens"] = max_tokens
        if json_mode:
            payload["response_format"] = {"type": "json_object"}
        body = json.dumps(payload).encode()
        started = time.perf_counter()
        status, headers, raw = await asyncio.to_thread(self._post, body)
        latency_ms = (time.perf_counter() - started) * 1000
        return self._parse(status, headers, raw, messages, latency_ms)

    # -- transport (runs in a worker thread) ---------------------------------------

    def _post(self, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "sigil",
        }
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions", data=body, headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, dict(response.headers), _read_bounded(response)
        except urllib.error.HTTPError as exc:
            try:
                raw = _read_bounded(exc)
            except OSError:
                raw = b""
            finally:
                exc.close()
            raise self._http_error(exc.code, dict(exc.headers or {}), raw) from None
        except TimeoutError:
            raise ProviderTransientError(
                f"{self._where()} timed out after {self.timeout:g}s"
            ) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise ProviderTransientError(
                    f"{self._where()} timed out after {self.timeout:g}s"
                ) from None
            raise ProviderTransientError(f"{self._where()} unreachable: {reason}") from None
        except (ConnectionError, http.client.HTTPException) as exc:
            raise ProviderTransientError(f"{self._where()} connection failed: {exc}") from None

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
        usage = _usage_of(data)
        model = data.get("model") if isinstance(data.get("model"), str) else self.model
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


def _read_bounded(response: Any) -> bytes:
    data: bytes = response.read(_MAX_BODY + 1)
    if len(data) > _MAX_BODY:
        raise ProviderResponseError(f"response body larger than {_MAX_BODY} bytes")
    return data


def _usage_of(data: Mapping[str, Any]) -> tuple[int, int] | None:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if _is_count(prompt) and _is_count(completion):
        return int(prompt), int(completion)
    total = usage.get("total_tokens")
    if _is_count(prompt) and _is_count(total) and total >= prompt:
        return int(prompt), int(total) - int(prompt)
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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


def _default_counter() -> Any:
    from sigil.pipeline.tokenizer import get_tokenizer

    return get_tokenizer()
