"""The Luhn check digit: SA ID numbers end in one, and so do the kiosk's slip codes."""

from __future__ import annotations


def luhn_digit(digits: str) -> str:
    """The check digit for ``digits``: catches one mistyped digit or a swapped pair."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def luhn_ok(digits: str) -> bool:
    """Whether the last digit is the Luhn check digit of the others."""
    return len(digits) > 1 and luhn_digit(digits[:-1]) == digits[-1]
