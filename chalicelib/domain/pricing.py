"""Prices and exact money. Amounts are integer micro-dollars; rates are Decimal.

A rate in USD per 1M tokens equals micro-dollars per token, so cost = tokens x rate,
rounded up to a whole micro-dollar (never under-bill).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

_PRICES = Path(__file__).resolve().parent.parent / "data" / "prices.json"


@dataclass(frozen=True)
class Price:
    model: str
    input: Decimal
    output: Decimal
    cached_input: Decimal
    source: str
    as_of: str
    indicative: bool

    def view(self) -> dict:
        return {"model": self.model, "input_usd_per_1m": str(self.input), "output_usd_per_1m": str(self.output),
                "cached_input_usd_per_1m": str(self.cached_input), "source": self.source,
                "as_of": self.as_of, "indicative": self.indicative}


@functools.lru_cache(maxsize=1)
def repository_prices() -> dict[str, Price]:
    raw = json.loads(_PRICES.read_text())["models"]
    return {m: Price(m, Decimal(p["input"]), Decimal(p["output"]), Decimal(p.get("cached_input", p["input"])),
                     p["source"], p["as_of"], bool(p.get("indicative"))) for m, p in raw.items()}


def price_for(model: str) -> Price | None:
    return repository_prices().get(model)


def micro_usd(tokens: int, rate: Decimal) -> int:
    return int((Decimal(tokens) * rate).to_integral_value(rounding=ROUND_CEILING))


def usd(micro: int) -> str:
    """Micro-dollars as an exact decimal string, e.g. 1234567 -> '1.234567'."""
    # Integer arithmetic: exact for any size (Decimal's quantize raises past 28 digits, which
    # made a huge worst case a 500 instead of the 429/400 it should be).
    whole, frac = divmod(abs(int(micro)), 1_000_000)
    return f"{'-' if micro < 0 else ''}{whole}.{frac:06d}"


def cost_of_usage(price: Price, input_tokens: int, cached_tokens: int, output_tokens: int) -> int:
    """Exact cost of one call: cached prompt tokens at the cached rate, the rest at the input rate,
    summed exactly and rounded up once, to a whole micro-dollar for the call (not per part)."""
    cached = max(0, min(cached_tokens, input_tokens))
    exact = (Decimal(input_tokens - cached) * price.input + Decimal(cached) * price.cached_input
             + Decimal(output_tokens) * price.output)
    return int(exact.to_integral_value(rounding=ROUND_CEILING))
