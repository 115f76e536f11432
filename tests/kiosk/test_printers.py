"""Printer trouble reaches the patient as "please ask at reception" and ops on /metrics; ESC/POS receipts."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from kiosk.viewer_token import verify_token
from tests.kiosk.conftest import issue, seed_study
from tests.kiosk.cups_peer import CupsPeer
from tests.kiosk.helpers import (
    audit,
    choose_language,
    escpos_qr_payloads,
    keypad,
    main_text,
    node_key,
    open_kiosk,
    scan,
    shot,
    token_of,
)
from tests.waiting import wait_until


def metrics(node: Any) -> str:
    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as response:
        return str(response.read().decode())


def wait_for_metric(node: Any, line: str, timeout: float = 10) -> None:
    wait_until(lambda: line in metrics(node), timeout, f"{line!r} on /metrics", every=0.2)


def test_paper_out_sends_the_patient_to_reception_and_shows_on_metrics(
    browser: Any, cups: CupsPeer, kiosk_factory: Any, tmp_path: Path
) -> None:
    node = kiosk_factory(cups_server=cups.server, cups_queue="paperout", printer_check_interval_s=0.5)
    seed_study(node.data_dir, "ACC-P1", report_text="Normal.")
    ticket = issue(node.data_dir, "ACC-P1", "Ayanda Khumalo")
    node.start()
    page, _ = open_kiosk(browser, node)
    choose_language(page, "en")
    scan(page, ticket.code)
    keypad(page, ticket.pin)
    page.click("#print")
    page.wait_for_selector("body[data-page=printer-problem]", timeout=20_000)
    assert "The printer is not working. Please ask at reception." in main_text(page)
    shot(page, tmp_path, "paper-out")
    wait_for_metric(node, 'edge_kiosk_printer_state{state="paper_out"} 1.0')
    assert "edge_kiosk_printer_ok 0.0" in metrics(node)
    prints = [e["outcome"] for e in audit(node) if e["action"] == "print"]
    assert prints == ["failed"]  # the allowance is not used up by a page that never came out
    page.context.close()


def test_offline_printer_hides_print_and_says_ask_at_reception(
    browser: Any, cups: CupsPeer, kiosk_factory: Any
) -> None:
    cups.lpadmin("-p", "offline", "-E", "-v", f"cups-pdf:/{cups.name}", "-P", "/usr/share/ppd/cups-pdf/CUPS-PDF_noopt.ppd")
    assert cups.run("cupsdisable", "offline").returncode == 0
    node = kiosk_factory(cups_server=cups.server, cups_queue="offline", printer_check_interval_s=0.5)
    seed_study(node.data_dir, "ACC-O1", report_text="Normal.")
    ticket = issue(node.data_dir, "ACC-O1", "Ayanda Khumalo")
    node.start()
    wait_for_metric(node, 'edge_kiosk_printer_state{state="offline"} 1.0')
    page, _ = open_kiosk(browser, node)
    choose_language(page, "st")
    scan(page, ticket.code)
    keypad(page, ticket.pin)
    text = main_text(page)
    assert "Tlaleho ya hao e lokile" in text and "Printara ha e sebetse" in text
    assert page.query_selector("#print") is None
    page.context.close()


def test_escpos_receipt_printer_gets_the_native_qr_with_a_valid_token(
    browser: Any, kiosk_factory: Any, tmp_path: Path
) -> None:
    device = tmp_path / "receipt.bin"
    node = kiosk_factory(printer="escpos", escpos_device=str(device), print_limit=1)
    study_uid = seed_study(node.data_dir, "ACC-E1", report_text="Finding: Normal chest.")
    ticket = issue(node.data_dir, "ACC-E1", "Ayanda Khumalo")
    node.start()
    page, _ = open_kiosk(browser, node)
    choose_language(page, "en")
    scan(page, ticket.code)
    keypad(page, ticket.pin)
    page.click("#print")
    page.wait_for_selector("body[data-page=printed]", timeout=20_000)
    urls = escpos_qr_payloads(device.read_bytes())
    assert len(urls) == 1
    uid, token = token_of(urls[0])
    assert uid == study_uid and verify_token(token, node_key(node), study_uid).study_uid == study_uid
    assert b"Ayanda Khumalo" in device.read_bytes()

    # One print allowed: the same slip now gets "ask at reception" instead of a Print button.
    page.click("#finish")
    choose_language(page, "en")
    scan(page, ticket.code)
    keypad(page, ticket.pin)
    assert "already printed" in main_text(page) and page.query_selector("#print") is None
    assert node.cli("kiosk", "allow-reprint", ticket.code).returncode == 0
    page.reload()
    assert page.query_selector("#print") is not None
    page.context.close()
