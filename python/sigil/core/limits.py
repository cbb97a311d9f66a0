"""Bounds on what a log line may hold, shared by the writer and every reader
(ARCHITECTURE.md contracts 2 and 13). The numbers are the native parser's own
(``rust/parse.rs``); ``core`` may not import the native module (only ``telemetry``
does), so they are stated here and ``tests/test_layers.py`` checks that they equal
``sigil._native.MAX_DEPTH`` and ``MAX_TOKENS``: the writer's and the readers'
bounds cannot drift apart.

The logger never writes a value outside these bounds, and a reader treats a line
outside them as malformed (skipped and counted), so a session can never be
poisoned by a line its own writer accepted.
"""

from __future__ import annotations

__all__ = ["DEPTH_MARKER", "MAX_METADATA_DEPTH", "MAX_TOKENS"]

#: Deepest nesting of containers (objects and arrays) in an event's ``metadata``,
#: the metadata object itself being level 1, so a whole line nests at most 65
#: deep: well inside the recursion limits of the JSON readers (serde_json's 128).
MAX_METADATA_DEPTH: int = 64

#: What the logger writes in place of a container nested deeper than the bound.
DEPTH_MARKER = f"[cut: nested deeper than {MAX_METADATA_DEPTH} levels]"

#: The largest valid ``tokens`` of an event (the range is 0..=MAX_TOKENS): every
#: integer up to it is exact in a double, so no reader rounds a count.
MAX_TOKENS: int = 2**53
