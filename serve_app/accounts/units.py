"""Credits as exact integers: one credit is ``CREDIT_UNITS`` (a million) units."""

from __future__ import annotations

from decimal import ROUND_DOWN, Decimal, InvalidOperation

from serve_app.config import CREDIT_UNITS

_DECIMALS = 6  # log10(CREDIT_UNITS)


def parse_credits(text: str | int | Decimal, *, allow_zero: bool = True) -> int:
    """``"12.5"`` -> 12_500_000 units. Raises ValueError with a one-line reason."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"credits must be a decimal number, got {str(text)!r}") from None
    if not value.is_finite():
        raise ValueError(f"credits must be a finite number, got {str(text)!r}")
    if value < 0:
        raise ValueError(f"credits must not be negative, got {str(text)!r}")
    if value == 0 and not allow_zero:
        raise ValueError("credits must be greater than zero")
    units = value * CREDIT_UNITS
    if units != units.to_integral_value():
        raise ValueError(f"credits have at most {_DECIMALS} decimal places, got {str(text)!r}")
    return int(units)


def units_to_decimal(units: int) -> Decimal:
    return (Decimal(units) / CREDIT_UNITS).quantize(Decimal(1).scaleb(-_DECIMALS), rounding=ROUND_DOWN)


def format_credits(units: int) -> str:
    """12_500_000 -> ``"12.5"``; 3 -> ``"0.000003"``; 0 -> ``"0"``. Exact, no exponent."""
    text = format(units_to_decimal(units), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


__all__ = ["CREDIT_UNITS", "format_credits", "parse_credits", "units_to_decimal"]
