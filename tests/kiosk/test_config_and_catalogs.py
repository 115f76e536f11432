"""Every [kiosk] key documented in the shipped edge.toml; every message in every language."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from edge.config import ConfigError
from edge.node.config import parse_config
from kiosk.config import LANGUAGES, KioskSection
from kiosk.i18n import CATALOG_DIR, load_catalog, placeholders

REPO = Path(__file__).resolve().parents[2]


def test_every_kiosk_key_is_in_the_shipped_edge_toml_with_its_default_and_a_comment() -> None:
    text = (REPO / "edge.toml").read_text()
    section = text.split("\n[kiosk]\n", 1)[1].split("\n[", 1)[0]
    shipped = tomllib.loads("[kiosk]\n" + section)["kiosk"]
    defaults = KioskSection().model_dump()
    assert set(shipped) == set(defaults)
    assert shipped == defaults
    for key in defaults:
        line = next(ln for ln in section.splitlines() if ln.startswith(f"{key} "))
        assert re.search(r"#\s*\S", line.split("=", 1)[1]), f"{key} has no comment"


@pytest.mark.parametrize(("value", "needle"), [
    ({"viewer_url_template": "https://v/?uid={study_uid}"}, "[kiosk] viewer_url_template"),
    ({"print_limit": 0}, "[kiosk] print_limit"),
    ({"languages": ["en", "fr"]}, "[kiosk] languages"),
    ({"pin": 1}, "[kiosk] pin: unknown key"),
])
def test_a_bad_kiosk_value_names_the_key(value: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_config({"kiosk": value}, Path("."))


def test_every_message_is_translated_with_the_same_placeholders_and_drafts_are_marked() -> None:
    assert sorted(p.stem for p in CATALOG_DIR.glob("*.toml")) == sorted(LANGUAGES)
    english = load_catalog("en")
    assert not english.needs_review
    for lang in LANGUAGES:
        catalog = load_catalog(lang)
        assert set(catalog.messages) == set(english.messages), lang
        for key, text in catalog.messages.items():
            assert text.strip(), (lang, key)
            assert placeholders(text) == placeholders(english.messages[key]), (lang, key)
        if lang != "en":
            # Drafts until a native speaker has read them: the catalog says so, message by message.
            assert catalog.needs_review >= set(english.messages) - {"lang_name", "pin_label"}, lang
