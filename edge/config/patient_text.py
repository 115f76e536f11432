"""A configured text a patient reads (where to collect the report, an exam's name), in each language.

The kiosk speaks English, isiZulu, isiXhosa, Afrikaans and Sesotho; a text the clinic types
into edge.toml reaches the patient's slip and screen, so it may be given per language::

    collect_at = { en = "the kiosk at the main door", zu = "ikhiyoski emnyango omkhulu" }

A plain string (the older form) is the English text. Ground: the console's and the kiosk's
sections both use it, neither imports the other.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import PlainValidator

Language = Literal["en", "zu", "xh", "af", "st"]
LANGUAGES: tuple[Language, ...] = ("en", "zu", "xh", "af", "st")
TEXT_CHARS = 80


def check_patient_text(value: object) -> str | dict[str, str]:
    """A string, or a table of language → text with an ``en`` entry; names what is wrong."""
    if isinstance(value, str):
        return _checked(value.strip(), "the text")
    if not isinstance(value, dict):
        raise ValueError('give a text, or one per language: { en = "...", zu = "..." }')
    unknown = sorted(str(k) for k in value if k not in LANGUAGES)
    if unknown:
        raise ValueError(f"unknown language {', '.join(unknown)} (known: {', '.join(LANGUAGES)})")
    if "en" not in value:
        raise ValueError("the English text (en = \"...\") is needed: it is what the staff's screens show")
    out: dict[str, str] = {}
    for lang, text in value.items():
        if not isinstance(text, str):
            raise ValueError(f"{lang}: must be a text in quotes")
        out[str(lang)] = _checked(text.strip(), lang)
        if not out[str(lang)]:
            raise ValueError(f"{lang}: is empty")
    return out


def _checked(text: str, what: str) -> str:
    if len(text) > TEXT_CHARS:
        raise ValueError(f"{what}: at most {TEXT_CHARS} characters")
    if any(not ch.isprintable() for ch in text):
        raise ValueError(f"{what}: no control characters")
    return text


PatientText = Annotated[str | dict[str, str], PlainValidator(check_patient_text)]


def english(value: str | dict[str, str]) -> str:
    """The English text (what staff screens and the worklist use)."""
    return value if isinstance(value, str) else value["en"]


def in_language(value: str | dict[str, str], language: str) -> str | None:
    """The text in ``language``, or None when the clinic gave none for it (the caller decides)."""
    if isinstance(value, str):
        return value if language == "en" and value else None
    return value.get(language)
