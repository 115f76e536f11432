"""Message catalogs: every string the patient sees or takes home, in en, zu, xh, af, st.

Catalogs are TOML files in ``kiosk/catalogs/`` (one per language, keyed by message id),
easy for a translator to edit; a message still waiting for a native speaker's review is
written ``key = { text = "...", review = true }``.
"""

from __future__ import annotations

import functools
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

CATALOG_DIR = Path(__file__).with_name("catalogs")
SOURCE_LANGUAGE = "en"


@dataclass(frozen=True)
class Catalog:
    language: str
    name: str
    messages: dict[str, str]
    needs_review: frozenset[str]

    def __call__(self, key: str, **values: object) -> str:
        """The message in this language (English if missing), with its placeholders filled."""
        text = self.messages.get(key)
        if text is None:
            text = load_catalog(SOURCE_LANGUAGE).messages[key]
        return text.format(**values) if values else text


def placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


@functools.cache
def load_catalog(language: str) -> Catalog:
    """Read one language's catalog (cached: catalogs ship with the code)."""
    if not language.isalpha():
        raise KeyError(language)
    path = CATALOG_DIR / f"{language}.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyError(language) from None
    messages: dict[str, str] = {}
    review: set[str] = set()
    for key, value in data.get("messages", {}).items():
        if isinstance(value, dict):
            messages[key] = str(value["text"])
            if value.get("review"):
                review.add(key)
        else:
            messages[key] = str(value)
    meta = data.get("meta", {})
    return Catalog(language=language, name=str(meta.get("name", language)), messages=messages,
                   needs_review=frozenset(review))


@dataclass
class CatalogCheck:
    """One catalog file against the English one (``edge kiosk catalog-check``)."""

    language: str
    total: int = 0
    drafts: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    bad_placeholders: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    error: str = ""


def check_catalog(path: Path) -> CatalogCheck:
    """Read ``path`` as a catalog and compare it with en.toml; never raises for a bad file."""
    english = load_catalog(SOURCE_LANGUAGE).messages
    report = CatalogCheck(language=path.stem)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        report.error = str(exc)
        return report
    report.language = str(data.get("meta", {}).get("language", path.stem))
    for key, value in data.get("messages", {}).items():
        text = value.get("text") if isinstance(value, dict) else value
        if not isinstance(text, str) or not text.strip():
            report.missing.append(key)
            continue
        report.texts[key] = text
        if isinstance(value, dict) and value.get("review"):
            report.drafts.append(key)
    report.total = len(report.texts)
    report.missing += sorted(set(english) - set(report.texts) - set(report.missing))
    report.unknown = sorted(set(report.texts) - set(english))
    for key, text in report.texts.items():
        try:
            wrong = key in english and placeholders(text) != placeholders(english[key])
        except ValueError:  # an unbalanced { or }
            wrong = True
        if wrong:
            report.bad_placeholders.append(key)
    return report
