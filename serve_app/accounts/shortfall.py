"""Insufficient credits: the 402 error raised by the store, carrying the balance."""

from __future__ import annotations

from serve_app.accounts.units import format_credits
from serve_app.errors import InsufficientFunds


class CreditShortfall(InsufficientFunds):
    """402 insufficient_funds, carrying the balance that was too small."""

    def __init__(self, *, images: int, model: str, amount_units: int, balance_units: int) -> None:
        super().__init__(
            f"Insufficient credits: {images} image(s) of model '{model}' cost "
            f"{format_credits(amount_units)} credits; the balance is {format_credits(balance_units)}."
        )
        self.balance_units = balance_units
