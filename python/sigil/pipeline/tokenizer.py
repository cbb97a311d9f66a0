"""Offline token counting with a real BPE tokenizer.

The offline pipeline reports the tokens each step actually consumes and produces,
so it needs a real tokenizer that works with no network. ``tiktoken`` alone would
download its BPE file on first use; instead we build a ``tiktoken.Encoding`` from
OpenAI's ``cl100k_base`` ranks vendored in ``data/`` (see ``data/README.md`` for the
source, licence and hash). The result is byte-for-byte ``tiktoken``'s
``cl100k_base``: counts match what the OpenAI API bills for GPT-4-class models.

Building the encoding takes ~150 ms (parsing 100K ranks), so it happens once per
process, lazily, and :func:`load_tokenizer` does it off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import threading
from importlib import resources
from typing import Protocol

__all__ = [
    "CL100K_SHA256",
    "TOKENIZER_NAME",
    "BPETokenizer",
    "Tokenizer",
    "get_tokenizer",
    "load_tokenizer",
]

#: The encoding the offline pipeline counts with.
TOKENIZER_NAME = "cl100k_base"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
# tiktoken_ext.openai_public.cl100k_base
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_CL100K_SPECIAL = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


class Tokenizer(Protocol):
    """Counts tokens; ``name`` says which encoding (logged with the counts)."""

    name: str

    def count(self, text: str) -> int: ...


class BPETokenizer:
    """A ``tiktoken`` encoding; special-token text is counted as ordinary text."""

    __slots__ = ("_encoding", "name")

    def __init__(self, encoding: object, name: str) -> None:
        self._encoding = encoding
        self.name = name

    def count(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text))  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        return list(self._encoding.encode_ordinary(text))  # type: ignore[attr-defined]

    def decode(self, tokens: list[int]) -> str:
        return str(self._encoding.decode(tokens))  # type: ignore[attr-defined]


_lock = threading.Lock()
_cached: BPETokenizer | None = None


def get_tokenizer() -> BPETokenizer:
    """The process-wide ``cl100k_base`` tokenizer, built on first call (blocking)."""
    global _cached
    if _cached is not None:
        return _cached
    with _lock:
        if _cached is None:
            _cached = _build_cl100k()
    return _cached


async def load_tokenizer() -> BPETokenizer:
    """:func:`get_tokenizer` without blocking the event loop on the first build."""
    if _cached is not None:
        return _cached
    return await asyncio.to_thread(get_tokenizer)


def _build_cl100k() -> BPETokenizer:
    try:
        import tiktoken
    except ImportError as exc:  # pragma: no cover - tiktoken is a declared dependency
        raise ModuleNotFoundError(
            "the offline pipeline needs the 'tiktoken' package: pip install tiktoken"
        ) from exc
    raw = gzip.decompress(
        resources.files("sigil.pipeline").joinpath("data/cl100k_base.tiktoken.gz").read_bytes()
    )
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CL100K_SHA256:
        raise ValueError(
            f"vendored cl100k_base ranks are corrupt (sha256 {digest}); reinstall sigil"
        )
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    encoding = tiktoken.Encoding(
        name="cl100k_base",
        pat_str=_CL100K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=_CL100K_SPECIAL,
    )
    return BPETokenizer(encoding, "cl100k_base")
