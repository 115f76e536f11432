"""`edge kiosk catalog-check`: what a clinic's reviewer runs before and after correcting a catalog."""

from __future__ import annotations

from pathlib import Path

from kiosk.i18n import CATALOG_DIR, load_catalog
from tests.conftest import edge_cli, write_config
from tests.kiosk.screens import set_key


def test_shipped_catalogs_pass_and_list_their_drafts(tmp_path: Path) -> None:
    config = write_config(tmp_path / "edge.toml", tmp_path / "var")
    result = edge_cli(config, "kiosk", "catalog-check", "--lang", "zu", "--drafts")
    assert result.returncode == 0, result.stderr
    zu = load_catalog("zu")
    assert f"zu ({CATALOG_DIR / 'zu.toml'}): {len(zu.messages)} messages, {len(zu.needs_review)} drafts to review, " \
           "0 missing, 0 unknown, 0 with changed placeholders" in result.stdout
    assert f"  draft: welcome = {zu('welcome')}" in result.stdout
    every = edge_cli(config, "kiosk", "catalog-check")
    assert [line.split(" ", 1)[0] for line in every.stdout.splitlines()] == ["zu", "xh", "af", "st"]


def test_a_corrected_copy_with_a_missing_an_unknown_and_a_changed_message_fails_naming_them(tmp_path: Path) -> None:
    config = write_config(tmp_path / "edge.toml", tmp_path / "var")
    text = (CATALOG_DIR / "zu.toml").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("printed_on =")]  # one left out
    text = "\n".join(lines).replace('{ text = "Phrinta umbiko wakho we-X-ray", review = true }',
                                    '"Phrinta umbiko wakho we-X-ray"')  # reviewed: no longer a draft
    text = text.replace("engu-{minutes}", "engu-{minute}")  # a placeholder typed wrong
    text += '\nwelcom = "Siyakwamukela"\n'  # a key English does not have
    copy = tmp_path / "zu.toml"
    copy.write_text(text)
    result = edge_cli(config, "kiosk", "catalog-check", "--file", str(copy), check=False)
    assert result.returncode == 1
    assert "1 missing, 1 unknown, 1 with changed placeholders" in result.stdout
    assert f"{len(load_catalog('zu').needs_review) - 2} drafts to review" in result.stdout  # printed_on, welcome
    assert "  missing (the kiosk shows English): printed_on" in result.stdout
    assert "  unknown to en.toml (misspelt?): welcom" in result.stdout
    assert "  placeholders differ from en.toml: locked" in result.stdout
    assert "Traceback" not in result.stderr

    copy.write_text("[messages\n")
    broken = edge_cli(config, "kiosk", "catalog-check", "--file", str(copy), check=False)
    assert broken.returncode == 1 and "unreadable:" in broken.stdout and "Traceback" not in broken.stderr


def test_the_clinics_own_texts_missing_a_language_are_listed(tmp_path: Path) -> None:
    config = write_config(tmp_path / "edge.toml", tmp_path / "var", kiosk={"languages": ["en", "zu"]})
    set_key(config, "kiosk", "collect_at", {"en": "Room 3", "zu": "Igumbi 3"})
    set_key(config, "console", "exams", ["Knee X-ray", {"en": "Hand X-ray", "zu": "I-X-ray yesandla"}])
    result = edge_cli(config, "kiosk", "catalog-check")
    assert result.returncode == 0, result.stderr
    assert "edge.toml [console] exams 'Knee X-ray': no name for zu (they read the English)" in result.stdout
    assert "collect_at" not in result.stdout and "Hand X-ray" not in result.stdout
