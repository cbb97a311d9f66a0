"""The pure-Python reference of the sanitizer's documented rules (tests only).

This was ``sigil.telemetry.sanitization`` before the rules moved to
``rust/sanitize.rs``; the tests check that the native rules agree with it.

Secret scrubbing for log events (spec 11.2, on by default: ``logging.sanitize_logs``).

The spec's pattern list both missed and over-matched: its ``sk-`` and
``api_key`` patterns missed today's key shapes (``sk-proj-...`` with dashes,
``"api_key": "..."`` in JSON), while ``\\b\\d{16}\\b`` and its e-mail pattern
redacted ordinary data (microsecond timestamps, addresses that are not
secrets). Here each secret has its own rule, tight enough to leave numbers,
UUIDs, timestamps, token counts and hashes alone:

* provider tokens by their fixed prefixes (AWS ``AKIA``/``ASIA``, GitHub
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

The sanitizer runs on every event, so a few substring tests decide which rule
families a string can trigger at all; most strings trigger none and cost no
regex work. Rules are linear in the input (no nested quantifiers over open-ended
runs), so a large blob cannot stall the logger.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from sigil.core.config import Settings

__all__ = ["REDACTED", "LogSanitizer", "sanitizer_from_settings"]

REDACTED = "***REDACTED***"

_Replacement = str | Callable[[re.Match[str]], str]


class _EntryLike(Protocol):
    message: str
    metadata: dict[str, Any]


_Entry = TypeVar("_Entry", bound=_EntryLike)

# ---------------------------------------------------------------------------
# The gate: cheap substring tests that name the rule families a string can
# trigger. Each test is at least as loose as the rules of its family (a miss here
# would skip a rule). Plain ``in`` tests beat one combined regex here: sre has
# no multi-literal search, so a big alternation costs several steps per character.

_AWS_GATE = re.compile(r"A(?:KIA|SIA|BIA|CCA)")
# Every card shape the rule accepts has four digits, an optional separator, four
# digits. Spelled with [0-9] classes: sre scans those faster than \d{4}.
_CARD_GATE = re.compile(r"[0-9][0-9][0-9][0-9][ -]?[0-9][0-9][0-9][0-9]")
_ENTROPY_GATE = re.compile(r"[A-Za-z0-9+/_-]{24}")


def _families(value: str) -> list[str]:
    found: list[str] = []
    lowered = value.lower()
    if "-----" in value:
        found.append("pem")
    if "eyJ" in value:
        found.append("jwt")
    if "A" in value and _AWS_GATE.search(value) is not None:
        found.append("aws")
    # Each rule's own literal: "github_pat_" holds no "gh".
    if ("gh" in value or "github_pat_" in value) and "_" in value:
        found.append("github")
    if "gl" in value and "-" in value:
        found.append("gitlab")
    if "xox" in value or "xapp-" in value or "hooks.slack" in lowered:
        found.append("slack")
    if "sk-" in value or "k_" in value or "AIza" in value or "hf_" in value or "whsec_" in value:
        found.append("apikey")
    if (
        "Q~" in value
        or "accountkey" in lowered
        or "sharedaccesskey" in lowered  # holds no "accountkey"
        or "sig=" in lowered
    ):
        found.append("azure")
    if "://" in value and "@" in value:
        found.append("url")
    if "bearer" in lowered:
        found.append("bearer")
    if (":" in value or "=" in value or "--" in value) and (
        # Spelled out: a generator over _KV_NAMES costs more than the tests themselves.
        "pass" in lowered
        or "pwd" in lowered
        or "secret" in lowered
        or "key" in lowered
        or "token" in lowered
        or "auth" in lowered
        or "credential" in lowered
    ):
        found.append("kv")
    if _CARD_GATE.search(value) is not None:
        found.append("card")
    if (":" in value or "=" in value) and _ENTROPY_GATE.search(value) is not None:
        found.append("entropy")
    return found


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _issuer_length_ok(digits: str) -> bool:
    """Whether some card network issues numbers with this prefix and length.

    Luhn alone passes one random number in ten; requiring a real issuer prefix
    keeps e.g. 16-digit microsecond epochs (which start with 1) out.
    """
    n = len(digits)
    two = int(digits[:2])
    three = int(digits[:3])
    four = int(digits[:4])
    if digits[0] == "4":  # Visa
        return n in (13, 16, 19)
    if 51 <= two <= 55 or 2221 <= four <= 2720:  # Mastercard
        return n == 16
    if two in (34, 37):  # American Express
        return n == 15
    if four == 6011 or two == 65 or 644 <= three <= 649:  # Discover
        return 16 <= n <= 19
    if 300 <= three <= 305 or two in (36, 38, 39):  # Diners Club
        return 14 <= n <= 19
    if 3528 <= four <= 3589:  # JCB
        return 16 <= n <= 19
    if two == 62:  # UnionPay
        return 16 <= n <= 19
    if two == 50 or 56 <= two <= 58 or two == 67:  # Maestro
        return 12 <= n <= 19
    return False


def _card(match: re.Match[str]) -> str:
    text = match.group(0)
    digits = text.replace(" ", "").replace("-", "")
    if _issuer_length_ok(digits) and _luhn_valid(digits):
        return "***CARD_NUMBER***"
    return text


def _high_entropy(match: re.Match[str]) -> str:
    """A ``name=value`` whose value looks random: upper case, lower case and digits
    mixed (hex hashes and UUIDs are not), close to the entropy a random string of
    its length has (85 % of log2(length), at most 4.5 bits per character: random
    base62 passes 19 times in 20 at 24 characters, CamelCase names do not), not a
    path. The name is kept."""
    value = match.group("value")
    if (
        value[0] in "/-"
        or value.count("/") >= 2
        or not any(c.isupper() for c in value)
        or not any(c.islower() for c in value)
        or not any(c.isdigit() for c in value)
        or _entropy(value) < min(4.5, 0.85 * math.log2(len(value)))
    ):
        return match.group(0)
    return match.group("head") + REDACTED


def _entropy(value: str) -> float:
    counts: dict[str, int] = {}
    for char in value:
        counts[char] = counts.get(char, 0) + 1
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


# Names whose value is a secret whatever it looks like, and names whose value is
# a secret only when it looks like a credential (see the module docstring).
_STRONG_NAMES = (
    r"pass(?:word|wd|phrase)|pwd|secret(?:[_-]?key)?|api[_-]?key|access[_-]?key|private[_-]?key"
)
_WEAK_NAMES = r"token|auth(?:orization)?|credentials?"
_WEAK_NAME = re.compile(_WEAK_NAMES)
_CREDENTIAL_LIKE = re.compile(r"(?=.*[A-Za-z])(?=.*\d).{8,}", re.DOTALL)


def _key_value(match: re.Match[str]) -> str:
    groups = match.groupdict()
    value_group = next(g for g in ("dq", "sq", "bare") if groups.get(g) is not None)
    value = match.group(value_group)
    name = match.group("name").lower()
    keep = (
        value.startswith("***")  # already redacted by a more specific rule
        or (name == "pwd" and value.startswith(("/", "~")))  # a shell's PWD=/home/...
        or (_WEAK_NAME.fullmatch(name) is not None and _CREDENTIAL_LIKE.fullmatch(value) is None)
    )
    if keep or not value:
        return match.group(0)
    start, end = match.span(value_group)
    offset = match.start()
    whole = match.group(0)
    return whole[: start - offset] + REDACTED + whole[end - offset :]


_Rules = tuple[tuple[re.Pattern[str], _Replacement], ...]


def _rules(*pairs: tuple[str, _Replacement], flags: int = 0) -> _Rules:
    return tuple((re.compile(pattern, flags), replacement) for pattern, replacement in pairs)


# The provider tokens' start: Python's ``\b``, or a "_" before the token, which is
# then glued to a snake_case name ("comp_sk-proj-...", "MY_TOKEN_ghp_...").
_LEAD = r"(?<![^\W_])"

# Families in the order they are applied: specific shapes first, so that
# "api_key=sk-proj-..." reads "api_key=***API_KEY***" rather than a generic mark.
_FAMILIES: tuple[tuple[str, _Rules], ...] = (
    (
        "pem",
        _rules(
            (
                r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
                r"(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|.*)",
                "***PRIVATE_KEY***",
            ),
            flags=re.DOTALL,
        ),
    ),
    (
        "jwt",
        _rules((_LEAD + r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*", "***JWT***")),
    ),
    ("aws", _rules((_LEAD + r"A(?:KIA|SIA|BIA|CCA)[A-Z0-9]{16}\b", "***AWS_ACCESS_KEY***"))),
    (
        "github",
        _rules(
            (_LEAD + r"gh[pousr]_[A-Za-z0-9]{30,251}\b", "***GITHUB_TOKEN***"),
            (_LEAD + r"github_pat_[A-Za-z0-9_]{22,255}", "***GITHUB_TOKEN***"),
        ),
    ),
    (
        "gitlab",
        _rules(
            (
                _LEAD + r"gl(?:pat|ptt|dt|rt|soat|cbt|ft|imt)-[A-Za-z0-9_-]{20,}",
                "***GITLAB_TOKEN***",
            )
        ),
    ),
    (
        "slack",
        _rules(
            (
                r"https?://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/-]+",
                "***SLACK_WEBHOOK***",
            ),
            (_LEAD + r"xox[abeprs]-[A-Za-z0-9-]{10,}", "***SLACK_TOKEN***"),
            (_LEAD + r"xapp-\d-[A-Za-z0-9-]{10,}", "***SLACK_TOKEN***"),
        ),
    ),
    (
        "apikey",
        _rules(
            (_LEAD + r"sk-ant-[A-Za-z0-9_-]{20,}", "***API_KEY***"),
            (_LEAD + r"sk-(?:proj|svcacct|admin|None)-[A-Za-z0-9_-]{20,}", "***API_KEY***"),
            # Legacy OpenAI keys and most OpenAI-compatible providers: no dashes in the
            # body, which keeps kebab-case names such as "sk-learn-..." out.
            (_LEAD + r"sk-[A-Za-z0-9]{20,}\b", "***API_KEY***"),
            (_LEAD + r"[rs]k_(?:live|test)_[A-Za-z0-9]{16,}", "***API_KEY***"),
            (_LEAD + r"AIza[0-9A-Za-z_-]{35}", "***API_KEY***"),
            (_LEAD + r"hf_[A-Za-z0-9]{30,}", "***API_KEY***"),
            (_LEAD + r"whsec_[A-Za-z0-9+/=]{24,}", "***API_KEY***"),
        ),
    ),
    (
        "azure",
        _rules(
            # Storage and Service Bus connection strings; the SAS signature of a URL;
            # Entra ID (Azure AD) client secrets, whose 4th-5th characters are "Q~".
            (
                r"(?i)(?P<head>\b(?:AccountKey|SharedAccessKey)=)[A-Za-z0-9+/]{20,}={0,2}",
                rf"\g<head>{REDACTED}",
            ),
            (r"(?i)(?P<head>[?&]sig=)[A-Za-z0-9%+/=]{20,}", rf"\g<head>{REDACTED}"),
            (r"(?<![\w~.-])[A-Za-z0-9_~.-]{3}[0-9]Q~[A-Za-z0-9_~.-]{31,34}", "***AZURE_SECRET***"),
        ),
    ),
    (
        "url",
        _rules(
            (
                # The password may contain '@'; the greedy run backtracks to the last '@'
                # before the host, and stops at '/', '?', '#' so "host:8080/x?a@b" is left.
                r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]{0,20}://[^\s:/?#@]*):[^\s/?#]+@",
                rf"\g<head>:{REDACTED}@",
            )
        ),
    ),
    (
        "bearer",
        _rules(
            (
                r"\b(?P<head>bearer\s+)(?=[A-Za-z0-9._~+/-]*\d)[A-Za-z0-9._~+/-]{12,}=*",
                rf"\g<head>{REDACTED}",
            ),
            flags=re.IGNORECASE,
        ),
    ),
    (
        "kv",
        _rules(
            (
                r"(?P<head>authorization(?:\\?[\"'])?[ \t]*[:=][ \t]*(?:\\?[\"'])?basic[ \t]+)"
                r"[A-Za-z0-9+/]{4,}={0,2}",
                rf"\g<head>{REDACTED}",
            ),
            (
                r"(?P<name>--(?:password|passwd|pass|token|api-?key|secret|client-secret))"
                r"(?P<sep>[ \t]+)(?P<bare>[^\s\"']+)",
                _key_value,
            ),
            (
                rf"(?P<name>{_STRONG_NAMES}|{_WEAK_NAMES})"
                r"(?P<sep>(?:\\?[\"'])?[ \t]*[:=][ \t]*)"
                r"(?:\"(?P<dq>(?:[^\"\\\n]|\\.)*)\""
                r"|'(?P<sq>[^'\n]*)'"
                r"|(?:\\[\"'])?(?P<bare>[^\s\"',;&\\]+))",
                _key_value,
            ),
            flags=re.IGNORECASE,
        ),
    ),
    (
        "entropy",
        _rules(
            (
                # The name starts only where a run of name characters does: tried at
                # every \b, the rule costs several times more on a long message.
                r"(?P<head>(?<![A-Za-z0-9_.-])[A-Za-z_][A-Za-z0-9_.-]{0,63}[ \t]*(?:=|:[ \t]*))"
                r"(?P<value>[A-Za-z0-9+/_-]{24,}={0,2})(?![A-Za-z0-9+/_=.:-])",
                _high_entropy,
            ),
        ),
    ),
    (
        "card",
        _rules(
            (
                # 13-19 digits, bare or in groups of 4 (4-6-5 for Amex) with one
                # separator; not part of a longer number, decimal, word or list.
                r"(?<![\w.+-])(?<![0-9][ -])"
                r"(?:[0-9]{13,19}|[0-9]{4}(?P<s1>[ -])[0-9]{4}(?P=s1)[0-9]{4}(?P=s1)[0-9]{1,7}"
                r"|[0-9]{4}(?P<s2>[ -])[0-9]{6}(?P=s2)[0-9]{4,5})"
                r"(?!\w|[.,][0-9]|[ -][0-9])",
                _card,
            )
        ),
    ),
)


def sanitize_ungated(value: str) -> str:
    """The plain rule table: every rule of every family applied in order, with no
    gate (what the gates may only speed up, never change)."""
    result = value
    for _, rules in _FAMILIES:
        for pattern, replacement in rules:
            result = pattern.sub(replacement, result)
    return result


# Credential-named keys: their string values are redacted whatever they contain.
# Plain "token" is not one: in LLM pipelines it is usually a text token.
_SENSITIVE_KEY = re.compile(
    r"(?:[a-z0-9]+[_.-])*?"
    r"(?:pass(?:word|wd|phrase)?|pwd|secret|client[_-]?secret|secret[_-]?key|api[_-]?key"
    r"|apikey|access[_-]?key(?:[_-]?id)?|private[_-]?key|auth[_-]?token|access[_-]?token"
    r"|refresh[_-]?token|session[_-]?token|id[_-]?token|bearer[_-]?token|api[_-]?token"
    r"|authorization|credentials?|cookie|set[_-]cookie)",
    re.IGNORECASE,
)
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

    def sanitize_string(self, value: str) -> str:
        """``value`` with every secret replaced by a ``***...***`` mark."""
        if value in self._clean:
            return value
        result = value
        families = _families(value)
        if families:
            for family, rules in _FAMILIES:
                if family in families:
                    for pattern, replacement in rules:
                        result = pattern.sub(replacement, result)
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
            known = self._key_cache[key] = _SENSITIVE_KEY.fullmatch(key) is not None
        return known


def sanitizer_from_settings(settings: Settings) -> LogSanitizer | None:
    """The sanitizer the settings ask for, or None when ``logging.sanitize_logs`` is off."""
    if not settings.logging.sanitize_logs:
        return None
    return LogSanitizer(additional_patterns=settings.logging.additional_patterns)
