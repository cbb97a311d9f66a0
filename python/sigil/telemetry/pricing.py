"""The cost of one model call, in US dollars, from a maintained price table.

Cost is priced once, per event, by the writer that knows the model and the
usage (the orchestrator's model steps, ``sigil proxy``'s metering), and stored
in the event's metadata as ``cost_usd``: a JSON number with at most 9 decimals
(nano-dollars), so that the native session model sums it exactly as integers,
whatever the order its threads merge in. A model with no price gets no
``cost_usd``: the views show it "unpriced", never $0.

Prices come from ``genai-prices`` (pinned in pyproject), read from the snapshot
bundled in the package: sigil never starts its ``UpdatePrices`` fetcher, so
pricing makes no network call. A user's ``pricing.models`` in ``config.yaml``
wins over the table for the models it names (matched by exact name).

``genai_prices`` costs 0.3-1.3 s to import (pydantic and a 30K-line table), so
it is imported lazily and off the event loop: :meth:`Pricer.warm` imports it on
a background thread when a run that may use a priced model starts, and
:meth:`Pricer.aprice` prices on a worker thread until that import is done.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from decimal import Decimal

    from sigil.core.config import Settings

__all__ = ["COST_KEY", "ModelPrice", "Pricer", "cost_number", "usd"]

#: The metadata key of an event's cost in US dollars.
COST_KEY = "cost_usd"
# (decimal is imported where a price is worked out: the monitor imports this
# module for usd() only, and its start-up is measured.)
#: Models found unpriced are remembered (a miss costs ~50 us); bounded, since the
#: proxy's model names come from its clients.
_MAX_REMEMBERED_MISSES = 1024


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A user's price for one model, in US dollars per million tokens."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    #: the price of input tokens read from the provider's prompt cache (None:
    #: the input price)
    cache_read_per_mtok: Decimal | None = None

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> Decimal:
        """``input_tokens`` counts the ``cached_tokens`` among them (as OpenAI's
        ``prompt_tokens`` and genai-prices' ``input_tokens`` do)."""
        from decimal import localcontext

        cached = min(cached_tokens, input_tokens)
        cache_rate = (
            self.input_per_mtok if self.cache_read_per_mtok is None else (self.cache_read_per_mtok)
        )
        # Exact: counts below 2**53 times prices of a few digits fit 60 digits.
        with localcontext(prec=60):
            per_mtok = (
                (input_tokens - cached) * self.input_per_mtok
                + cached * cache_rate
                + output_tokens * self.output_per_mtok
            )
            return per_mtok.scaleb(-6)


def cost_number(cost: Decimal) -> float:
    """``cost`` rounded to the nano-dollar, as the JSON number an event carries.

    Rounded to 9 decimals, a cost below $1M has at most 15 significant digits,
    which a double holds exactly enough that its shortest text (what orjson and
    ``repr`` write) is that decimal again: readers parse the text, not the double.
    """
    from decimal import ROUND_HALF_EVEN, Decimal

    # Costs are stored to the nano-dollar: the unit the native fold sums in.
    return float(cost.quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN))


class Pricer:
    """Prices model calls: the user's overrides first, then genai-prices' table."""

    def __init__(self, overrides: Mapping[str, ModelPrice] | None = None) -> None:
        self.overrides: dict[str, ModelPrice] = dict(overrides or {})
        self._unpriced: set[str] = set()
        #: models whose table price is a plain rate per token (no tiers, no dates):
        #: priced here in microseconds instead of genai-prices' ~0.5 ms per call
        self._rates: dict[str, ModelPrice] = {}
        self._loaded = threading.Event()
        self._loading: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Pricer:
        """The pricer of ``pricing.models`` (validated by :mod:`sigil.core.config`)."""
        from decimal import Decimal

        models = settings.pricing.models
        return cls(
            {
                name: ModelPrice(
                    Decimal(str(price["input_per_mtok"])), Decimal(str(price["output_per_mtok"]))
                )
                for name, price in models.items()
            }
        )

    # -- the table, imported off the hot path --------------------------------------------------

    def warm(self) -> None:
        """Import genai-prices on a background thread (once); returns at once."""
        with self._lock:
            if self._loading is not None or self._loaded.is_set():
                return
            self._loading = threading.Thread(
                target=self._load, name="sigil-pricing-import", daemon=True
            )
            self._loading.start()

    @property
    def ready(self) -> bool:
        """True once pricing needs no import (the table is loaded)."""
        return self._loaded.is_set()

    def _load(self) -> None:
        try:
            _table()
        finally:
            self._loaded.set()

    # -- pricing -------------------------------------------------------------------------------

    def price(
        self, model: str | None, input_tokens: int, output_tokens: int, cached_tokens: int = 0
    ) -> Decimal | None:
        """The cost of one call in US dollars (exact), or None when the model is unpriced.

        ``cached_tokens`` of the ``input_tokens`` were read from the provider's
        prompt cache: priced at the model's cache-read rate.

        Blocks on the import of genai-prices the first time a model without an
        override is priced: on an event loop use :meth:`aprice`.
        """
        if not model:
            return None
        override = self.overrides.get(model)
        cached = min(cached_tokens, input_tokens)
        if override is not None:
            return override.cost(input_tokens, output_tokens, cached)
        rates = self._rates.get(model)
        if rates is not None:
            return rates.cost(input_tokens, output_tokens, cached)
        if model in self._unpriced:
            return None
        usage_type, calc_price = _table()
        self._loaded.set()
        try:
            usage = (
                usage_type(
                    input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cached
                )
                if cached
                else usage_type(input_tokens=input_tokens, output_tokens=output_tokens)
            )
            result = calc_price(usage, model_ref=model)
        except LookupError:
            # No provider or model matches, or no price at this date: unpriced.
            if len(self._unpriced) < _MAX_REMEMBERED_MISSES:
                self._unpriced.add(model)
            return None
        from decimal import Decimal

        if len(self._rates) < _MAX_REMEMBERED_MISSES:
            rates = _plain_rates(result)
            if rates is not None:
                self._rates[model] = rates
        return Decimal(result.total_price)

    async def aprice(
        self, model: str | None, input_tokens: int, output_tokens: int, cached_tokens: int = 0
    ) -> Decimal | None:
        """:meth:`price` without blocking the event loop on the table's import."""
        known = model in self.overrides or model in self._unpriced or model in self._rates
        if not model or known or self.ready:
            return self.price(model, input_tokens, output_tokens, cached_tokens)
        import asyncio  # the CLI's non-async paths (monitor --once) never import it

        return await asyncio.to_thread(
            self.price, model, input_tokens, output_tokens, cached_tokens
        )

    def cost_meta(self, cost: Decimal | None) -> dict[str, Any]:
        """``{"cost_usd": number}`` for a priced call, ``{}`` for an unpriced one."""
        return {} if cost is None else {COST_KEY: cost_number(cost)}

    async def ameta(
        self, model: str | None, input_tokens: int, output_tokens: int, cached_tokens: int = 0
    ) -> tuple[dict[str, Any], bool]:
        """The event metadata of a call's cost (``{"cost_usd": ...}``, or ``{}`` when
        unpriced), and whether the task was cancelled meanwhile.

        Pricing waits (on a worker thread) only while the table is still being
        imported; a cancellation then must not lose the call's tokens: the cost
        is left out (the event counts as unpriced), the caller records the event
        and then raises ``CancelledError`` itself.
        """
        try:
            cost = await self.aprice(model, input_tokens, output_tokens, cached_tokens)
            return self.cost_meta(cost), False
        except BaseException as exc:
            import asyncio  # (imported already: this is a coroutine)

            if not isinstance(exc, asyncio.CancelledError):
                raise
            return {}, True


#: Prices of units a sigil usage never reports (cache writes, audio, image and
#: video tokens, searches): they price nothing here, whatever their form.
_ZERO_UNITS = frozenset(
    {
        "cache_write_mtok", "cache_write_1h_mtok", "input_audio_mtok",
        "output_audio_mtok", "cache_audio_read_mtok", "input_image_mtok", "output_image_mtok",
        "cache_image_read_mtok", "input_video_mtok", "output_video_mtok", "web_searches_kcount",
        "storage_searches_kcount",
    }
)  # fmt: skip


def _plain_rates(result: Any) -> ModelPrice | None:
    """The model's price as two rates when genai-prices would price any usage of
    input, cached input and output tokens linearly: one price at every date (no
    conditional prices), and no price but ``input_mtok``/``output_mtok``/
    ``cache_read_mtok`` as plain decimals (not tiers) besides those of units
    sigil never reports. None
    otherwise: such models keep going through ``calc_price``
    (tests/test_pricing.py checks the rates against it for every model)."""
    from decimal import Decimal

    info = result.model
    # (Variants apply only with a price context, which sigil never passes.)
    if isinstance(info.prices, list):
        return None
    prices = {
        k: v for k, v in vars(result.model_price).items() if v is not None and not k.startswith("_")
    }
    if not set(prices) - _ZERO_UNITS <= {"input_mtok", "output_mtok", "cache_read_mtok"}:
        return None
    rates = [prices.get(key, Decimal(0)) for key in ("input_mtok", "output_mtok")]
    cache = prices.get("cache_read_mtok")
    if not all(type(rate) is Decimal for rate in rates) or not (
        cache is None or type(cache) is Decimal
    ):
        return None
    return ModelPrice(rates[0], rates[1], cache)


def _table() -> tuple[Any, Any]:
    """genai-prices' ``Usage`` and ``calc_price`` (the import is the cost)."""
    from genai_prices import Usage, calc_price

    return Usage, calc_price


def usd(nanousd: int) -> float:
    """Whole nano-dollars (the session model's unit) as the dollars a JSON number
    shows: the double nearest to the exact decimal, whose shortest text is that
    decimal (a unit change, not a sum)."""
    return nanousd / 1e9
