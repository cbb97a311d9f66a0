"""Secret scrubbing for log events (spec 11.2, on by default: ``logging.sanitize_logs``).

The spec's pattern list both missed and over-matched: its ``sk-`` and
``api_key`` patterns missed today's key shapes (``sk-proj-...`` with dashes,
``"api_key": "..."`` in JSON), while ``\\b\\d{16}\\b`` and its e-mail pattern
redacted ordinary data (microsecond timestamps, addresses that are not
secrets). Here each secret has its own rule, tight enough to leave numbers,
UUIDs, timestamps, token counts and hashes alone:

* provider tokens by their fixed prefixes, standing alone or after a ``_``
  (``comp_sk-proj-...``) but not glued to a letter or digit (AWS ``AKIA``/``ASIA``, GitHub
  ``ghp_``/``github_pat_``..., GitLab ``glpat-``, Slack ``xox?-`` and webhook
  URLs, OpenAI ``sk-``/``sk-proj-``, Anthropic ``sk-ant-``, Stripe keys and
  ``whsec_`` webhook secrets, Google, Hugging Face), JWTs and PEM private key blocks;
* Azure: ``AccountKey=``/``SharedAccessKey=`` in connection strings, a URL's SAS
  ``sig=``, Entra ID client secrets (``xxxNQ~...``);
* a ``name=value`` or ``name: value`` whose value looks random (24+ characters
  mixing upper case, lower case and digits, with the entropy of a random string);
* passwords in URLs (``scheme://user:***@host`` keeps the user and host);
* ``Bearer``/``Basic`` credentials and ``password=``/``secret:``/``"api_key": "..."``
  pairs; a ``token=`` or ``auth=`` value is redacted only when it looks like a
  credential (8+ characters with letters and digits), because LLM logs are full
  of ``token: 512`` and ``bos_token: <s>``;
* card numbers only when their issuer prefix, length and Luhn check all agree;
* in dicts, string values under credential-named keys (``password``, ``api_key``,
  ``client_secret``, ...), whatever they look like.

Every string of an event is read: its message, ``event_type`` and ``component``,
and in its metadata the values and the keys (a scrubbed key that would repeat
another key of its dict takes a ``#2``, ``#3``, ... suffix: no value is lost).

The rules live in ``rust/sanitize.rs`` (one pattern set: this class, the native
writer's ``sanitize=True`` and every other file sigil writes use it): a
multi-pattern automaton over the rules' literal prefixes decides which rule
families a string can trigger at all; most strings trigger none and cost no
regex work. Before it, one pass over the bytes lets through ASCII text that no
rule can match (no ``:``, ``=`` or ``--``, fewer than 13 digits, no run of 12
token characters, or of 20 word characters where the text has no blank) without
running the automaton. Rules are linear in the
input (Rust's ``regex`` has no backtracking), so a large blob cannot stall the
logger.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sigil._native import is_sensitive_key as _is_sensitive_key
from sigil._native import sanitize_string as _sanitize_builtin

if TYPE_CHECKING:
    from sigil.core.config import Settings

__all__ = ["REDACTED", "LogSanitizer", "sanitizer_from_settings"]

REDACTED = "***REDACTED***"


class _EntryLike(Protocol):
    message: str
    metadata: dict[str, Any]


_Entry = TypeVar("_Entry", bound=_EntryLike)

# Metadata values repeat (component, model and intent names), so short strings
# found clean are remembered. Only clean strings: a secret is never kept.
_CACHE_LIMIT = 4096
_CLEAN_CACHE_MAX_LEN = 256


def _unique_key(name: str, keys: dict[Any, Any], given: list[str]) -> str:
    """``name``, or the first ``name#2``, ``name#3``, ... that is neither a key of
    the dict (``keys``) nor already given to a scrubbed key (``given``)."""
    candidate, n = name, 1
    while candidate in keys or candidate in given:
        n += 1
        candidate = f"{name}#{n}"
    return candidate


class LogSanitizer:
    """Removes secrets from log messages and metadata before they are written.

    ``additional_patterns`` are extra ``(pattern, replacement)`` pairs (config:
    ``logging.additional_patterns``), applied after the built-in rules to every
    string, case-insensitively as in the spec (use ``(?-i:...)`` to opt out).

    Nothing is mutated: strings and containers that need no change are returned
    as they are, and a container with a redacted value is copied.
    """

    __slots__ = ("_clean", "_extra", "_key_cache")

    def __init__(self, additional_patterns: Iterable[Sequence[str]] | None = None) -> None:
        self._extra: list[tuple[re.Pattern[str], str]] = []
        for pair in additional_patterns or ():
            pattern, replacement = pair
            self._extra.append((re.compile(pattern, re.IGNORECASE), replacement))
        self._key_cache: dict[str, bool] = {}
        self._clean: set[str] = set()

    @property
    def builtin_only(self) -> bool:
        """Whether only the built-in rules apply (no ``additional_patterns``): then
        the native writer's ``sanitize=True`` does exactly what this object does."""
        return not self._extra

    def sanitize_string(self, value: str) -> str:
        """``value`` with every secret replaced by a ``***...***`` mark."""
        if value in self._clean:
            return value
        result = _sanitize_builtin(value)
        for pattern, text in self._extra:
            result = pattern.sub(text, result)
        if result == value and len(value) <= _CLEAN_CACHE_MAX_LEN:
            if len(self._clean) >= _CACHE_LIMIT:
                self._clean.clear()
            self._clean.add(value)
        return result

    def sanitize_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        """Sanitise a dict recursively (nested dicts, lists and tuples), its string
        keys as its values.

        A value under a credential-named key is judged by the key as written. A
        scrubbed key never replaces another entry: keys that needed no scrubbing
        keep their names, and a scrubbed key that would repeat one of them or an
        earlier scrubbed key takes the first free ``#2``, ``#3``, ... suffix
        (``{"sk-proj-A...": 1, "sk-proj-B...": 2}`` becomes
        ``{"***API_KEY***": 1, "***API_KEY***#2": 2}``).
        """
        copy: dict[str, Any] | None = None
        given: list[str] = []
        for index, (key, value) in enumerate(data.items()):
            if isinstance(value, str) and value and self._is_sensitive_key(key):
                cleaned: Any = REDACTED
            else:
                cleaned = self._sanitize_value(value)
            name = key
            if isinstance(key, str):
                scrubbed = self.sanitize_string(key)
                if scrubbed != key:
                    name = _unique_key(scrubbed, data, given)
                    given.append(name)
            if copy is None and (cleaned is not value or name is not key):
                copy = dict(list(data.items())[:index])
            if copy is not None:
                copy[name] = cleaned
        return data if copy is None else copy

    def sanitize_entry(self, entry: _Entry) -> _Entry:
        """A copy of a log entry dataclass with its message, metadata and (where it
        has them) ``event_type`` and ``component`` sanitised."""
        names: dict[str, str] = {}
        for field in ("event_type", "component"):
            text = getattr(entry, field, None)
            if isinstance(text, str):
                names[field] = self.sanitize_string(text)
        return dataclasses.replace(
            entry,  # type: ignore[type-var]  # any LogEntry-like dataclass
            message=self.sanitize_string(entry.message),
            metadata=self.sanitize_dict(entry.metadata),
            **names,
        )

    def _sanitize_value(self, value: Any) -> Any:
        if isinstance(value, str):
            cleaned = self.sanitize_string(value)
            return value if cleaned == value else cleaned
        if isinstance(value, dict):
            return self.sanitize_dict(value)
        if isinstance(value, list | tuple):
            items = [self._sanitize_value(item) for item in value]
            if all(new is old for new, old in zip(items, value, strict=True)):
                return value
            return items if isinstance(value, list) else tuple(items)
        return value

    def _is_sensitive_key(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        known = self._key_cache.get(key)
        if known is None:
            if len(self._key_cache) >= _CACHE_LIMIT:
                self._key_cache.clear()
            known = self._key_cache[key] = _is_sensitive_key(key)
        return known


def sanitizer_from_settings(settings: Settings) -> LogSanitizer | None:
    """The sanitizer the settings ask for, or None when ``logging.sanitize_logs`` is off."""
    if not settings.logging.sanitize_logs:
        return None
    return LogSanitizer(additional_patterns=settings.logging.additional_patterns)
