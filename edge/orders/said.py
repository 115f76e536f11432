"""South African ID numbers: 13 digits, YYMMDD birth date, citizenship digit, Luhn check.

A mistyped ID on a worklist follows the patient's images to the cloud, so the console
refuses one that cannot be right and says why, in words a technician can act on.
"""

from __future__ import annotations

import datetime as dt

from edge.check_digit import luhn_ok


class BadIdNumber(ValueError):
    """The message is shown to the technician as it is."""


def birth_date(id_number: str, today: dt.date | None = None) -> dt.date:
    """The date in an ID number's first six digits; the century is the one not in the future."""
    today = today or dt.date.today()
    yy, mm, dd = int(id_number[0:2]), int(id_number[2:4]), int(id_number[4:6])
    century = 2000 if 2000 + yy <= today.year else 1900
    return dt.date(century + yy, mm, dd)


def check_id_number(text: str, date_of_birth: dt.date | None = None, today: dt.date | None = None) -> str:
    """The ID number cleaned of spaces, or BadIdNumber with a reason a technician understands."""
    number = "".join(text.split())
    if len(number) != 13 or not number.isdigit() or not number.isascii():
        raise BadIdNumber("The SA ID number must be exactly 13 digits.")
    try:
        born = birth_date(number, today)
    except ValueError:
        raise BadIdNumber("The SA ID number's first 6 digits are not a real date of birth (YYMMDD).") from None
    if number[10] not in "012":
        raise BadIdNumber("The SA ID number's 11th digit must be 0, 1 or 2.")
    if not luhn_ok(number):
        raise BadIdNumber("The SA ID number's check digit is wrong: please check every digit.")
    if date_of_birth is not None and date_of_birth.strftime("%y%m%d") != number[:6]:
        raise BadIdNumber(
            f"The SA ID number says born {born.isoformat()}, but the date of birth entered is "
            f"{date_of_birth.isoformat()}."
        )
    return number


def sex_from_id(id_number: str) -> str:
    """F for 0000–4999 in digits 7–10, M for 5000–9999 (a hint only; the form's choice wins)."""
    return "F" if int(id_number[6:10]) < 5000 else "M"
