"""Money as people and files see it: one trim and one rendering, used everywhere.

Amounts stay :class:`~decimal.Decimal` until they are rendered. :func:`trim_usd` drops the
zeros a fixed scale adds (``9.975000000000000000`` -> ``9.975``) without switching to
exponent form; :func:`format_usd` renders dollars to 1/100 of a cent, at least to the cent,
with no trailing zeros past that (``$9.975``, ``$12.50``, ``$0.0125``, ``$3.00``).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

_PLACES = Decimal("0.0001")
# The ledger keeps money to 18 decimal places (decimal(38, 18)): every USD amount fal bills.
MONEY_SCALE = 18


def decimal_places(value: Decimal) -> int:
    """How many decimal places ``value`` needs (trailing zeros not counted)."""
    exponent = trim_usd(value).as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def trim_usd(value: Decimal) -> Decimal:
    """``value`` without trailing zeros, never in exponent form (``1E+1`` stays ``10``)."""
    if value == value.to_integral_value():
        return value.quantize(Decimal(1))
    return value.normalize()


def format_usd(value: Decimal | None) -> str:
    """``$9.975``; ``?`` when the amount is unknown."""
    if value is None:
        return "?"
    text = f"{trim_usd(value.quantize(_PLACES, rounding=ROUND_HALF_EVEN)):f}"
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, _, cents = digits.partition(".")
    return f"{sign}${whole}.{cents.ljust(2, '0')}"
