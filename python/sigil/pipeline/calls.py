"""What a model call carries and costs: one implementation for the pipeline's
provider and for the proxy (which sits above the pipeline, ARCHITECTURE.md Layers,
and re-exports these from :mod:`sigil.proxy.usage` and :mod:`sigil.proxy.policy`).

* the prompt's text and its token count (:func:`prompt_estimate_text`,
  :func:`count_tokens`, :func:`prompt_overhead`): what a call is reserved at;
* the output cap of a call that sets none (:data:`DEFAULT_CALL_CAP`) and the
  field it goes in (:func:`chat_cap_field`);
* :func:`redact`: a text about a call with the keys it carried cut out.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "DEFAULT_CALL_CAP",
    "EXACT_CHARS",
    "KEY_RUN",
    "MIN_SECRET",
    "chat_cap_field",
    "count_tokens",
    "prompt_estimate_text",
    "prompt_overhead",
    "prompt_text",
    "redact",
    "utf8_size",
]

#: The output cap of a call whose client set none (``sigil proxy --call-cap``'s default).
DEFAULT_CALL_CAP = 4096


def chat_cap_field(base_url: str) -> str:
    """The chat field an output cap goes in, for the server at ``base_url``:
    ``max_completion_tokens`` on OpenAI's and Azure's hosts (their reasoning
    models refuse ``max_tokens``), else ``max_tokens`` (what every
    OpenAI-compatible server knows)."""
    host = urllib.parse.urlsplit(base_url).hostname or ""
    official = host.endswith(("openai.com", "openai.azure.com"))
    return "max_completion_tokens" if official else "max_tokens"


#: Keys whose values are not text the tokenizer would see (image data and URLs).
_NOT_TEXT = frozenset({"image_url", "url", "file_data", "b64_json"})


def _strings(value: Any, out: list[str], depth: int = 0) -> None:
    """Append every string inside ``value`` (the text a prompt is made of) to
    ``out``, in order (a plain recursion: generators cost twice as much per
    message, on every call the proxy forwards; past a depth no message reaches,
    an explicit stack, so no nesting hides a string)."""
    if isinstance(value, str):
        out.append(value)
    elif depth >= 16:
        _walk(value, out, keys=False)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key in _NOT_TEXT:
                continue
            if type(item) is str or isinstance(item, str):
                out.append(item)
            elif item is not None and type(item) is not int:
                _strings(item, out, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _strings(item, out, depth + 1)


def _walk(value: Any, out: list[str], *, keys: bool) -> None:
    """:func:`_strings` without recursion, for any depth (``keys``: the mapping
    keys too, and numbers and booleans as written)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Mapping):
            for key, inner in reversed(list(item.items())):
                if key in _NOT_TEXT and not keys:
                    continue
                stack.append(inner)
                if keys:
                    stack.append(str(key))
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif keys and item is not None:
            out.append(str(item))


#: The fields of a request whose text is the prompt itself (the messages, the
#: Responses API's input and instructions, legacy completions' and embeddings' prompt).
_PROMPT_FIELDS = ("messages", "input", "prompt", "instructions")

#: Request fields known not to reach the model as text: which model, who calls,
#: how to sample, how much to write, whether to stream or store, where to keep
#: state. Every other field is counted whole (:func:`prompt_estimate_text`), so
#: a field the API gains later is reserved for rather than ignored.
_NOT_PROMPT = frozenset(
    {
        # every endpoint
        "model", "user", "metadata", "store", "stream", "stream_options", "service_tier",
        "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
        # sampling and output caps
        "temperature", "top_p", "n", "best_of", "seed", "stop", "logit_bias", "logprobs",
        "top_logprobs", "presence_penalty", "frequency_penalty", "max_tokens",
        "max_completion_tokens", "max_output_tokens", "echo", "parallel_tool_calls",
        "reasoning_effort", "reasoning", "verbosity", "modalities", "audio",
        # the Responses API's state and delivery
        "background", "include", "truncation", "max_tool_calls", "previous_response_id",
        "conversation",
        # embeddings' output shape
        "encoding_format", "dimensions",
    }
)  # fmt: skip


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text of a request's prompt: messages, input, prompt and instructions."""
    parts: list[str] = []
    for key in _PROMPT_FIELDS:
        value = body.get(key)
        if value is not None:
            _strings(value, parts)
    return "\n".join(parts)


def prompt_estimate_text(body: Mapping[str, Any]) -> str:
    """The text a request's prompt tokens are estimated from: :func:`prompt_text`,
    and every other field but those known not to reach the model (:data:`_NOT_PROMPT`),
    whole, as JSON: tools and functions, ``tool_choice``, a ``response_format``
    or the Responses API's ``text.format`` schema, legacy completions' ``suffix``,
    and any field not known yet. Reading too much costs reserving a little more
    until the call settles; reading too little lets calls overshoot the budget."""
    parts: list[str] = []
    for key, value in body.items():
        if key in _NOT_PROMPT:
            continue
        if key in _PROMPT_FIELDS:
            if value is not None:
                _strings(value, parts)
        elif isinstance(value, str):
            parts.append(value)
        elif isinstance(value, (dict, list)):
            try:
                parts.append(orjson.dumps(value).decode())
            except orjson.JSONEncodeError:  # nested deeper than orjson writes
                _walk(value, parts, keys=True)
    return "\n".join(parts)


#: Characters of a text counted with the tokenizer; past them, each UTF-8 byte
#: counts as a token. Counting costs ~0.1 us a character on the transport's
#: thread, which every call shares: 256 Ki characters is ~25 ms, while a 32 MB
#: body would be seconds.
EXACT_CHARS = 256 * 1024


def utf8_size(text: str) -> int:
    """The UTF-8 length of ``text``: an upper bound of its tokens under any
    byte-level BPE (a token covers at least one byte)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def count_tokens(text: str, size: int | None = None) -> int:
    """The ``cl100k_base`` tokens of ``text`` at a bounded cost: counted for its
    first :data:`EXACT_CHARS` characters, bounded by its UTF-8 length beyond
    (``size``: that length of the whole text, when known). Exact for the text a
    call usually carries; for a larger one an upper bound, ~4x its count past
    that point: a prompt of more than ~65,000 tokens is then reserved at more
    than it costs, and refused where it would have fit only within ~4x of what
    is left of the budget."""
    from sigil.pipeline.tokenizer import get_tokenizer

    if len(text) <= EXACT_CHARS:
        return get_tokenizer().count(text)
    head = text[:EXACT_CHARS]
    if size is None:
        size = utf8_size(text)
    return get_tokenizer().count(head) + size - utf8_size(head)


def prompt_overhead(body: Mapping[str, Any]) -> int:
    """Tokens a prompt costs beyond its text: the chat format's few per message
    (OpenAI's own count is 3 per message and 3 to prime the reply; 4 allows for
    names and other servers' templates), and the prompts given as token IDs
    (legacy completions' and embeddings' token arrays: no text, one token each)."""
    items = 0
    for key in ("messages", "input"):
        value = body.get(key)
        if isinstance(value, list):
            items += len(value)
    return 4 * items + 3 + _token_ids(body.get("prompt")) + _token_ids(body.get("input"))


def _token_ids(value: object) -> int:
    """The token IDs of a prompt given as a token array or a list of them."""
    if not isinstance(value, list):
        return 0
    count = 0
    for item in value:
        if isinstance(item, int):
            count += 1
        elif isinstance(item, list):
            count += sum(1 for t in item if isinstance(t, int))
    return count


# -- keys in texts ------------------------------------------------------------------------

#: A secret shorter than this is not cut at all (it would cut letters out of words).
MIN_SECRET = 4
#: A run of this many characters of a key, or more, is cut wherever a text
#: holds it: a key cut short, the start a masked form shows, a key split by the
#: server. Shorter runs are left (4 characters of a key is what providers show
#: themselves; cutting them would cut ordinary words).
KEY_RUN = 8
#: A text that ends with this much of a key (cut short by a length limit) is redacted too.
_MIN_PREFIX = 6
_REDACTED = "[REDACTED]"
#: What masks the middle of a key in a masked form (``gsk_Z2a9…T2u9``,
#: ``sk-proj-****T2u9``): an ellipsis, bullets, stars, dots or x's.
_MASK = re.compile(r"[*\u2022\u00b7\u2026]+|\.{3,}|[xX#]{4,}")
#: The public starts of the key families' keys (OpenAI's project, service-account
#: and admin keys, Anthropic's, OpenRouter's, Groq's, xAI's, Google's): a run of a
#: key lying inside one is no secret (every such key starts so; a model writing
#: ``sk-proj-`` is not quoting the key). Longest first.
_PUBLIC_PREFIXES = (
    "sk-ant-admin01-", "sk-ant-api03-", "sk-svcacct-", "sk-or-v1-", "sk-admin-",
    "sk-proj-", "sk-ant-", "xai-", "gsk_", "AIza", "sk-",
)  # fmt: skip
#: Header schemes whose token is the key (``Bearer <key>``).
_SCHEMES = ("bearer", "basic", "token")


@dataclass(frozen=True, slots=True)
class _Key:
    """What finds one key's pieces in a text (built once per key)."""

    key: str
    #: the key's forms as a text holds them: itself, JSON- and bytes-escaped
    forms: tuple[str, ...]
    #: every run of KEY_RUN characters of a form (what extends a run)
    grams: frozenset[str]
    #: the first of them in a text but those inside the key's public prefix (one
    #: C-level scan; None: no gram)
    find: re.Pattern[str] | None
    #: the stretches of a text that may hold a gram: KEY_RUN or more of the forms'
    #: characters (a cheaper scan; the grams are looked for in these only)
    windows: re.Pattern[str]
    #: a masked form's start and end: each key[:n] by its last character, each
    #: key[-n:] by its first, longest first
    heads: dict[str, tuple[str, ...]]
    tails: dict[str, tuple[str, ...]]


@functools.lru_cache(maxsize=64)
def _key(key: str) -> _Key:
    forms = tuple(
        dict.fromkeys((key, json.dumps(key)[1:-1], repr(key.encode("utf-8", "replace"))[2:-1]))
    )
    public = next((p for p in _PUBLIC_PREFIXES if key.startswith(p)), "")
    grams = frozenset(
        form[at : at + KEY_RUN] for form in forms for at in range(len(form) - KEY_RUN + 1)
    )
    secret = sorted(gram for gram in grams if gram not in public)
    find = re.compile("|".join(map(re.escape, secret))) if secret else None
    chars = "".join(re.escape(c) for c in sorted(set("".join(forms))))
    windows = re.compile(f"[{chars}]{{{KEY_RUN},}}")
    heads: dict[str, list[str]] = {}
    tails: dict[str, list[str]] = {}
    for n in range(len(key) - 1, 1, -1):
        if n >= 3:
            heads.setdefault(key[n - 1], []).append(key[:n])
        tails.setdefault(key[-n], []).append(key[-n:])
    return _Key(
        key, forms, grams, find, windows,
        {c: tuple(ns) for c, ns in heads.items()}, {c: tuple(ns) for c, ns in tails.items()},
    )  # fmt: skip


def _keys_of(secrets: Iterable[str]) -> tuple[list[str], list[str]]:
    """The exact texts to cut (each secret, and ``Bearer <key>``) and the keys
    whose runs and masked forms are cut (a header's token, not its scheme)."""
    exact: dict[str, None] = {}
    keys: dict[str, None] = {}
    for secret in secrets:
        if len(secret) < MIN_SECRET:
            continue
        exact[secret] = None
        scheme, _, rest = secret.partition(" ")
        key = rest.strip() if rest and scheme.lower() in _SCHEMES else secret
        if len(key) >= MIN_SECRET:
            keys[key] = None
            exact[f"Bearer {key}"] = None
    return list(exact), list(keys)


def _find_all(text: str, piece: str, spans: list[tuple[int, int]]) -> None:
    at = text.find(piece)
    while at != -1:
        spans.append((at, at + len(piece)))
        at = text.find(piece, at + 1)


def _runs(text: str, k: _Key, spans: list[tuple[int, int]]) -> None:
    """Append the maximal runs of ``text`` made of the key's KEY_RUN-grams
    (overlapping or touching occurrences are one run), in order."""
    if k.find is None:  # a key shorter than a run: its forms whole
        for form in k.forms:
            _find_all(text, form, spans)
        return
    grams, search, last = k.grams, k.find.search, len(text) - KEY_RUN
    for window in k.windows.finditer(text):
        _window_runs(text, grams, search, window.start(), window.end(), last, spans)


def _window_runs(
    text: str,
    grams: frozenset[str],
    search: Any,
    pos: int,
    stop: int,
    last: int,
    spans: list[tuple[int, int]],
) -> None:
    found = search(text, pos, stop)
    while found is not None:
        begin = found.start()
        end = begin + KEY_RUN
        while begin and text[begin - 1 : begin - 1 + KEY_RUN] in grams:
            begin -= 1  # back over the public prefix before it (``sk-proj-`` + secret)
        at = begin + 1
        while at <= end and at <= last:  # extend over the grams it overlaps or touches
            if text[at : at + KEY_RUN] in grams:
                end = at + KEY_RUN
            at += 1
        spans.append((begin, end))
        found = search(text, end + 1, stop)


def _masked(text: str, k: _Key, runs: list[tuple[int, int]], spans: list[tuple[int, int]]) -> None:
    """Append the key's masked forms in ``text``: a start of the key (3+
    characters) or a run or masked form already cut, a mask, then an end of the
    key (2+ characters; 4+ with neither)."""
    heads, tails, size = k.heads, k.tails, len(text)
    starts = [begin for begin, _ in runs]
    masked_to = -1  # where the masked forms found so far end (they are found in order)
    for mask in _MASK.finditer(text):
        begin, end = mask.span()
        if end >= size or (ns := tails.get(text[end])) is None:
            continue  # the usual case (markdown's stars, an ellipsis): a quick reject
        tail = next((len(s) for s in ns if text.startswith(s, end)), 0)
        if not tail:
            continue
        head = 0
        if begin and (ns := heads.get(text[begin - 1])) is not None:
            head = next(
                (len(s) for s in ns if len(s) <= begin and text.startswith(s, begin - len(s))), 0
            )
        at = bisect.bisect_left(starts, begin) - 1  # the last run starting before the mask
        cut_before = (at >= 0 and begin <= runs[at][1]) or begin <= masked_to
        if head or cut_before or tail >= 4:
            spans.append((begin - head, end + tail))
            masked_to = max(masked_to, end + tail)


def redact(text: str, secrets: Iterable[str], *, cut_off: bool = True) -> str:
    """``text`` without the keys in ``secrets`` (the proxy's: a call's key
    headers' values; the provider's: its API key), one rule for both: each secret
    itself (and ``Bearer <key>`` whole), any run of :data:`KEY_RUN` or more of a
    key's characters (its JSON- and bytes-escaped forms too) but one lying inside
    the key's public prefix (``sk-proj-``, :data:`_PUBLIC_PREFIXES`), and a masked
    form of a key (:func:`_masked`) each become ``[REDACTED]``, and a text ending
    with a secret's first 6+ characters too (a message cut short); with
    ``cut_off`` False (a model's answer, never cut short) that end only when the
    text holds another piece of a key.

    Near-linear in the text: one C-level scan for the runs and one for the masks,
    and per mask a dictionary lookup. ``text`` itself comes back when nothing is cut."""
    exact, keys = _keys_of(secrets)
    spans: list[tuple[int, int]] = []
    for key in keys:
        k = _key(key)
        runs: list[tuple[int, int]] = []
        _runs(text, k, runs)
        _masked(text, k, runs, spans)
        spans += runs
    for piece in exact:
        _find_all(text, piece, spans)
    if cut_off or spans:
        for secret in (*exact, *keys):
            # The longest end of the text that begins the secret.
            for size in range(min(len(secret) - 1, len(text)), _MIN_PREFIX - 1, -1):
                if text.endswith(secret[:size]):
                    spans.append((len(text) - size, len(text)))
                    break
    if not spans:
        return text
    spans.sort()
    out: list[str] = []
    done = 0
    begin, end = spans[0]
    for b, e in spans[1:]:  # overlapping or touching pieces are one
        if b <= end:
            end = max(end, e)
            continue
        out += (text[done:begin], _REDACTED)
        done, begin, end = end, b, e
    out += (text[done:begin], _REDACTED, text[end:])
    return "".join(out)
