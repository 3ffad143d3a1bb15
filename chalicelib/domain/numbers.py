"""The one strict place where text and JSON from a client become numbers (and where ids are checked).

Why one place: Python's own parsers are kind in ways that become 500s later. `'²'.isdigit()` is
true but `int('²')` raises; `int('٣')` is 3 and `int(' 1_0 ')` is 10; `float(10**400)` raises
OverflowError; `json.loads('1e400')` is `inf`, later served as `Infinity` (not JSON); and DynamoDB
refuses a number with more than 38 significant digits. Everything here is pure and never raises
on any input except through the documented NumberError / None answers.
"""
from __future__ import annotations

import math
import re
from typing import Any

DYNAMO_DIGITS = 38                        # DynamoDB: a number has at most 38 significant digits
MAX_MAGNITUDE = 10 ** DYNAMO_DIGITS       # |x| < 1e38 for any number a request may carry
MIN_MAGNITUDE = 1e-38                     # and nonzero |x| >= 1e-38 (DynamoDB stops at 1e-130; floats at 5e-324)
MAX_ID_DIGITS = 9                         # versions, indexes, windows: < 10**9
INT64_MAX = 2 ** 63 - 1                   # OpenAI's `seed` is an int64

_ASCII_INT = re.compile(r"[0-9]+")        # [0-9] is ASCII only in Python's re; \d is not
_DYNAMO_NUMBER = re.compile(r"-?([0-9]{1,38})(?:\.([0-9]{1,38}))?")   # as DynamoDB takes them, no exponent


class NumberError(ValueError):
    """A value that is not an acceptable number; str() is a phrase such as 'must be a finite number'."""


def ascii_int(text: Any, *, max_digits: int = MAX_ID_DIGITS) -> int | None:
    """A non-negative integer written with 1..max_digits ASCII digits, else None (never raises)."""
    if not isinstance(text, str) or not 0 < len(text) <= max_digits or not _ASCII_INT.fullmatch(text):
        return None
    return int(text)


def query_int(text: Any, lo: int, hi: int) -> int | None:
    """An optional '-' then ASCII digits, within lo..hi (a query parameter), else None."""
    if not isinstance(text, str) or len(text) > 20:
        return None
    negative = text.startswith("-")
    value = ascii_int(text[1:] if negative else text, max_digits=19)
    if value is None:
        return None
    value = -value if negative else value
    return value if lo <= value <= hi else None


_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]{1,3})?|-?\.[0-9]+")


def decimal_text(text: Any) -> bool:
    """Whether `text` is a plain decimal in ASCII (optionally with a short exponent), as a money
    amount is written; Decimal() alone also takes ' 1_0 ', '٣', 'NaN' and 'Infinity'."""
    return isinstance(text, str) and len(text) <= 80 and _DECIMAL.fullmatch(text) is not None


def dynamo_number_text(text: Any) -> bool:
    """Whether `text` is a number DynamoDB stores as given (a cursor's N value): plain decimal,
    at most 38 digits each side of the point and at most 38 significant digits in all."""
    if not isinstance(text, str) or len(text) > 80:
        return False
    match = _DYNAMO_NUMBER.fullmatch(text)
    if match is None:
        return False
    digits = (match.group(1) + (match.group(2) or "")).strip("0")
    return len(digits) <= DYNAMO_DIGITS


def check(value: Any, *, integer: bool = False, lo: float | None = None, hi: float | None = None) -> int | float:
    """A JSON number from a request body, checked: not a bool, an int or a float, finite, |x| < 1e38
    (ints are compared as ints before any float conversion, so a 401-digit int is refused, not an
    OverflowError), nonzero |x| >= 1e-38, integral when `integer` (an int is returned), and within
    lo..hi when given. Raises NumberError saying what is wrong."""
    kind = "an integer" if integer else "a number"
    where = (f"between {_show(lo)} and {_show(hi)}" if lo is not None and hi is not None
             else f"at least {_show(lo)}" if lo is not None else f"at most {_show(hi)}" if hi is not None else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NumberError(f"must be {kind} {where}".rstrip())
    if isinstance(value, int):
        if not -MAX_MAGNITUDE < value < MAX_MAGNITUDE:
            raise NumberError(f"must be {where}" if where else f"must be {kind} of at most {DYNAMO_DIGITS} digits")
    else:
        if not math.isfinite(value):
            raise NumberError(f"must be {kind} (finite)")
        if not (value == 0 or MIN_MAGNITUDE <= abs(value) < MAX_MAGNITUDE):
            raise NumberError(f"must be {kind} between 1e-38 and 1e38 in magnitude (or 0)")
        if integer:
            if not value.is_integer():
                raise NumberError(f"must be {kind}")
            value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise NumberError(f"must be {where}")
    return value


def finite(value: Any, *, integer: bool = False) -> int | float | None:
    """`check` without bounds, as a value or None (for callers with their own messages)."""
    try:
        return check(value, integer=integer)
    except NumberError:
        return None


def to_float(value: Any) -> float | None:
    """float(value) for an acceptable number (see `check`), else None; never OverflowError."""
    number = finite(value)
    return None if number is None else float(number)


def _show(bound: float | None) -> str:
    if isinstance(bound, float) and bound.is_integer():
        bound = int(bound)
    return f"{bound:,}" if isinstance(bound, int) else f"{bound:g}"


# ---- the numbers an OpenAI-style request carries -------------------------------------------------

MAX_OUTPUT_TOKENS = 1_000_000             # any one output cap; no model served here writes more in one call
MAX_TOTAL_OUTPUT_TOKENS = 16_000_000      # n x the output cap: 128 choices of 125,000 tokens
# name -> (integer?, lo, hi), as OpenAI's document bounds them (seed: int64); output caps bounded so
# a call's worst case (written to the ledger and held) always fits DynamoDB's 38 digits.
REQUEST_LIMITS: dict[str, tuple[bool, float, float]] = {
    "max_tokens": (True, 1, MAX_OUTPUT_TOKENS),
    "max_completion_tokens": (True, 1, MAX_OUTPUT_TOKENS),
    "max_completions_tokens": (True, 1, MAX_OUTPUT_TOKENS),     # the spelling OpenAI's graders use
    "max_output_tokens": (True, 1, MAX_OUTPUT_TOKENS),
    "max_tool_calls": (True, 0, MAX_OUTPUT_TOKENS),
    "n": (True, 1, 128),
    "top_logprobs": (True, 0, 20),
    "seed": (True, -(2 ** 63), INT64_MAX),
    "temperature": (False, 0, 2),
    "top_p": (False, 0, 1),
    "frequency_penalty": (False, -2, 2),
    "presence_penalty": (False, -2, 2),
}
LOGIT_BIAS = (-100, 100)


def request_problem(body: dict) -> tuple[str, str] | None:
    """The first number in a request (its top-level fields, logit_bias' values, n x the output
    cap) that OpenAI's document or DynamoDB would refuse, as (field, phrase); None when all fit.
    null is left to the caller (OpenAI allows it for every optional field)."""
    if not isinstance(body, dict):
        return None
    for name, value in body.items():
        if name in REQUEST_LIMITS:
            integer, lo, hi = REQUEST_LIMITS[name]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            integer, lo, hi = False, None, None     # any other number: finite, at most 38 digits
        else:
            continue
        if value is None:
            continue
        if integer and isinstance(value, float):
            return name, "must be an integer"    # a JSON integer, as OpenAI's document types it
        try:
            check(value, integer=integer, lo=lo, hi=hi)
        except NumberError as exc:
            return name, str(exc)
    bias = body.get("logit_bias")
    if isinstance(bias, dict):
        for token, value in bias.items():
            try:
                check(value, lo=LOGIT_BIAS[0], hi=LOGIT_BIAS[1])
            except NumberError as exc:
                return f"logit_bias.{token}"[:80], str(exc)
    caps = [body.get(k) for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")]
    cap = max((c for c in caps if isinstance(c, int) and not isinstance(c, bool)), default=0)
    choices = body.get("n") if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool) else 1
    if cap * choices > MAX_TOTAL_OUTPUT_TOKENS:
        return "n", f"times the output cap (max_tokens) must be at most {MAX_TOTAL_OUTPUT_TOKENS:,} tokens"
    return None


# ---- JSON -------------------------------------------------------------------------------------

def json_float(text: str) -> float:
    """json.loads' parse_float: 1e400 is not infinity (json would make it inf, later served as the
    non-JSON `Infinity`); a float that overflows is refused (ValueError, a 400 for a request)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


# ---- text -------------------------------------------------------------------------------------

def utf8_len(text: Any) -> int | None:
    """Bytes of `text` in UTF-8, or None when it cannot be encoded (lone surrogates, which
    json.loads makes from '\\ud800' and which DynamoDB, boto and every encoder refuse)."""
    if not isinstance(text, str):
        return None
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None
