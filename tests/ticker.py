"""A Python thread that notes the time every 2 ms: a native call that holds the
GIL freezes it, so the gaps between its ticks tell whether a call released it."""

from __future__ import annotations

import itertools
import threading
import time
from types import TracebackType


class Ticker:
    """``with Ticker() as t:`` runs the ticking thread for the block (it has
    ticked a few times before the block starts); ``t.stamps`` are its ticks."""

    def __init__(self, every: float = 0.002) -> None:
        self.every = every
        self.stamps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def _tick(self) -> None:
        while not self._stop.is_set():
            self.stamps.append(time.monotonic())
            time.sleep(self.every)

    def __enter__(self) -> Ticker:
        self._thread.start()
        deadline = time.monotonic() + 10
        while len(self.stamps) < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(self.stamps) >= 5, "the ticking thread did not run"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> list[float]:
        """The ticks from ``start`` to ``end`` (``time.monotonic()`` values)."""
        return [t for t in self.stamps if start <= t <= end]

    def max_gap(self, start: float | None = None, end: float | None = None) -> float:
        """The longest time without a tick from ``start`` to ``end`` (default: all)."""
        lo = self.stamps[0] if start is None else start
        hi = self.stamps[-1] if end is None else end
        return max(b - a for a, b in itertools.pairwise([lo, *self.between(lo, hi), hi]))
