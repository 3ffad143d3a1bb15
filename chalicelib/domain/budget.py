"""Budgets: periods, worst-case reservations and threshold crossings. Pure; money in micro-dollars."""
from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, localcontext

from chalicelib.domain import numbers, pricing

DEFAULT_OUTPUT_CAP = 4096        # tokens reserved when a call sets no max_tokens
# Bounds on money an admin can type: past them a typo (or a 39-digit number) is refused
# before it is saved, instead of breaking every later read of the team's budget.
MAX_BUDGET_MICRO = 10_000_000 * 1_000_000      # $10M a month
MAX_PRICE_PER_1M = 100_000                     # USD per 1M tokens
_CHARS_PER_TOKEN = 3             # pessimistic on purpose: reservations must not under-estimate


def period_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m")


def resets_at(period: str) -> int:
    year, month = (int(x) for x in period.split("-"))
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp())


def to_micro(usd, maximum_micro: int | None = None) -> int:
    """An exact USD amount (string, int or Decimal; floats are read through their repr) in micro-dollars."""
    text = repr(usd) if isinstance(usd, float) else str(usd)
    if isinstance(usd, bool) or not isinstance(usd, (str, int, float, Decimal)) or len(text) > 40:
        raise ValueError("must be a decimal amount such as \"25.00\"")
    if not numbers.decimal_text(text):     # ASCII digits only: Decimal('٣') is 3, Decimal(' 1_0 ') is 10
        raise ValueError("not a number")
    with localcontext() as exact:           # 40 digits exactly, never rounded to the default 28
        exact.prec = 100
        value = Decimal(text)
        if abs(value) >= Decimal(10) ** 30:
            raise ValueError("must be less than 10^30")
        return _whole_micro(value, maximum_micro)


def _whole_micro(value: Decimal, maximum_micro: int | None) -> int:
    if not value.is_finite() or value < 0:
        raise ValueError("must be a finite, non-negative amount")
    if maximum_micro is not None and value * 1_000_000 > maximum_micro:
        raise ValueError(f"at most {pricing.usd(maximum_micro)}")
    micro = value * 1_000_000
    if micro != micro.to_integral_value():
        raise ValueError("at most 6 decimal places (micro-dollars)")
    return int(micro)


def prompt_tokens_estimate(payload) -> int:
    """An upper-bound-ish token count of whatever the caller sends (chars / 3, plus framing)."""
    import json

    return len(json.dumps(payload, ensure_ascii=False)) // _CHARS_PER_TOKEN + 16


def worst_case_micro(price: pricing.Price, prompt_tokens: int, max_output_tokens: int | None,
                     choices: int = 1) -> int:
    """The most a call can cost: the prompt, plus every requested choice at its output cap."""
    output = (max_output_tokens if max_output_tokens else DEFAULT_OUTPUT_CAP) * max(1, choices)
    return pricing.micro_usd(prompt_tokens, price.input) + pricing.micro_usd(output, price.output)


def crossed(thresholds: list[float], limit_micro: int, before: int, after: int, alerted: list) -> list[float]:
    """Thresholds that spend passes going from `before` to `after`, not yet announced this period."""
    return [t for t in sorted(thresholds)
            if t not in alerted and before < Decimal(str(t)) * limit_micro <= after]
