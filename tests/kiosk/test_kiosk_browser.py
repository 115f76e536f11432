"""The patient's walk through the kiosk in real headless Chromium, printing to a real CUPS (cups-pdf)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from kiosk.viewer_token import verify_token
from tests.kiosk.conftest import issue, seed_study
from tests.kiosk.cups_peer import CupsPeer
from tests.kiosk.helpers import (
    audit,
    choose_language,
    keypad,
    main_text,
    node_key,
    open_kiosk,
    qr_urls_in_pdf,
    scan,
    shot,
    token_of,
)

REPORT = "Diagnostic imaging report\n  Finding: No acute cardiopulmonary findings. Heart size normal."


def wrong_pin(pin: str) -> str:
    return "".join(str((int(d) + 1) % 10) for d in pin)


def test_patient_prints_report_in_english_and_the_qr_opens_their_study(
    browser: Any, cups: CupsPeer, kiosk_factory: Any, tmp_path: Path
) -> None:
    node = kiosk_factory(cups_server=cups.server, cups_queue="kiosk", max_pin_failures=3)
    study_uid = seed_study(node.data_dir, "ACC-K1", report_text=REPORT)
    ticket = issue(node.data_dir, "ACC-K1", "Thandiwe Nkosi", "Chest X-ray")
    node.start()
    pdfs_before = len(list(cups.pdf_dir.rglob("*.pdf")))

    page, urls = open_kiosk(browser, node)
    assert "Print your X-ray report" in main_text(page)
    for name in ("English", "isiZulu", "isiXhosa", "Afrikaans", "Sesotho"):
        assert name in main_text(page)
    shot(page, tmp_path, "01-language")
    choose_language(page, "en")
    assert "Scan your slip" in main_text(page)
    scan(page, ticket.code)
    assert "Enter your PIN" in main_text(page)

    keypad(page, wrong_pin(ticket.pin))
    text = main_text(page)
    assert "The slip number or the PIN is not right" in text and "Tries left: 2" in text
    shot(page, tmp_path, "02-wrong-pin")

    keypad(page, ticket.pin)
    text = main_text(page)
    assert "Your report is ready" in text
    assert "Thandiwe Nkosi" in text and "Chest X-ray" in text and "2026-11-23" in text
    assert "No acute cardiopulmonary findings" in text and "Prints left: 2" in text
    shot(page, tmp_path, "03-preview")

    started = time.monotonic()
    page.click("#print")
    page.wait_for_selector("body[data-page=printed]", timeout=30_000)
    assert "Please take your page from the printer." in main_text(page)
    shot(page, tmp_path, "04-printed")

    # The page came out of CUPS as a PDF: its QR opens this study with a token that verifies.
    pdf = cups.wait_for_pdfs(pdfs_before + 1)[-1]
    assert time.monotonic() - started < 30
    found = qr_urls_in_pdf(pdf, tmp_path)
    assert len(found) == 1, found
    assert found[0].startswith("https://film.example/film/") and study_uid not in found[0]
    uid, token = token_of(found[0])
    claims = verify_token(token, node_key(node), study_uid=study_uid)
    assert uid == study_uid and claims.node_id == "test-node"
    assert claims.expires_at > time.time() + 29 * 86400

    # No patient data in any URL the kiosk used, nor in the node's log.
    assert urls and all(u.startswith(node.url) for u in urls)
    for secret in (ticket.code, ticket.pin, "Thandiwe", "Nkosi", "ACC-K1"):
        assert not any(secret in u for u in urls), secret
        assert secret not in node.log_text(), secret

    entries = audit(node)
    outcomes = [(e["action"], e["outcome"]) for e in reversed(entries)]
    assert outcomes == [("issue", "issued"), ("lookup", "wrong_pin"), ("lookup", "ready"), ("print", "printed")]
    assert all(e["code"] == ticket.code for e in entries)
    assert not any(ticket.pin in str(value) for e in entries for value in e.values())
    with sqlite3.connect(node.data_dir / "edge.db") as db:
        assert db.execute("SELECT report_state FROM study").fetchone() == ("printed",)
        assert ticket.pin not in "".join(str(r) for r in db.execute("SELECT * FROM kiosk_ticket"))
    page.context.close()


def test_isizulu_patient_is_locked_out_and_told_when_a_report_is_not_ready(
    browser: Any, cups: CupsPeer, kiosk_factory: Any, tmp_path: Path
) -> None:
    node = kiosk_factory(cups_server=cups.server, max_pin_failures=2, lockout_minutes=10,
                         report_estimate_hours=6)
    seed_study(node.data_dir, "ACC-Z1", report_text=REPORT)
    seed_study(node.data_dir, "ACC-Z2")  # X-ray taken, no report yet
    ready = issue(node.data_dir, "ACC-Z1", "Sipho Dlamini")
    waiting = issue(node.data_dir, "ACC-Z2", "Nomsa Zulu")
    node.start()

    page, urls = open_kiosk(browser, node)
    choose_language(page, "zu")
    assert "Skena isiliphu sakho" in main_text(page)
    assert page.get_attribute("html", "lang") == "zu"
    scan(page, ready.code)
    keypad(page, wrong_pin(ready.pin))
    assert "Imizamo esele: 1" in main_text(page)
    keypad(page, wrong_pin(ready.pin))
    text = main_text(page)
    assert "Imizamo engalungile miningi kakhulu" in text and "10" in text
    shot(page, tmp_path, "zu-locked")

    # Locked means locked: even the right PIN is not checked now.
    page.click("#finish")
    choose_language(page, "zu")
    scan(page, ready.code)
    keypad(page, ready.pin)
    assert "Imizamo engalungile miningi kakhulu" in main_text(page)

    page.click("#finish")
    choose_language(page, "zu")
    scan(page, waiting.code)
    keypad(page, waiting.pin)
    text = main_text(page)
    assert "Umbiko wakho awukakulungi" in text and "Sicela ubuye emva kwamahora angaba ngu-6" in text
    shot(page, tmp_path, "zu-not-ready")

    outcomes = [e["outcome"] for e in reversed(audit(node)) if e["action"] == "lookup"]
    assert outcomes == ["wrong_pin", "wrong_pin", "locked", "not_ready"]
    for secret in (ready.code, ready.pin, waiting.code, waiting.pin, "Sipho", "Nomsa"):
        assert not any(secret in u for u in urls)
        assert secret not in node.log_text()
    page.context.close()


def test_idle_kiosk_returns_to_start_showing_nothing_of_the_last_patient(
    browser: Any, cups: CupsPeer, kiosk_factory: Any, tmp_path: Path
) -> None:
    node = kiosk_factory(cups_server=cups.server, idle_timeout_s=5)
    seed_study(node.data_dir, "ACC-I1", report_text=REPORT)
    ticket = issue(node.data_dir, "ACC-I1", "Pieter van Wyk")
    node.start()
    page, _ = open_kiosk(browser, node)
    choose_language(page, "af")
    assert "Skandeer jou strokie" in main_text(page)
    scan(page, ticket.code)
    keypad(page, ticket.pin)
    assert "Pieter van Wyk" in main_text(page) and "Jou verslag is gereed" in main_text(page)

    page.wait_for_selector("body[data-page=language]", timeout=15_000)  # nobody touched it: back to the start
    shot(page, tmp_path, "idle-reset")
    assert "Pieter" not in main_text(page)
    page.go_back()
    page.wait_for_load_state()
    assert "Pieter" not in main_text(page)  # not cached, and the session is gone
    page.context.close()
