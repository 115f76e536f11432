"""A report's life at both ends, on one real node (``edge run``) with Orthanc as the cloud (issue 14).

The technician registers a visit and the DR sends its image; the node uploads it. The
reader's PACS then stores, in turn, a draft, a signed report and an amendment of it in
Orthanc. The node polls only every 10 minutes here, so each report reaches the node only
because the technician pressed "Check for the report now" on the console. The patient
walks the kiosk in isiZulu in headless Chromium and prints to a real CUPS (cups-pdf);
the printed PDFs are read back with pdftotext.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.conftest import EdgeNode
from tests.console.conftest import TECH, TECH_PASSWORD, console_node, log_in
from tests.console.helpers import ConsoleClient
from tests.edge.helpers import query
from tests.kiosk.cups_peer import CupsPeer
from tests.kiosk.helpers import choose_language, keypad, main_text, qr_urls_in_pdf, scan, shot
from tests.peers.orthanc import OrthancPeer, start_orthanc
from tests.sync.test_outbox import FAST_SYNC, dx_series
from tests.sync.test_reports import reader_sr
from tests.waiting import wait_until

DRAFT = "Query fracture of the left radius."
FINAL = "Fracture of the distal <b>left</b> radius & ulna."
AMENDED = "Fracture of the distal right radius; the ulna is intact."
DOCTOR = "Dlamini & <b>Sons</b>^Thandi"  # a hostile PN: it must print literally
PHONE = "031 555 0142"


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[OrthancPeer]:
    peer = start_orthanc(tmp_path / "cloud")
    yield peer
    peer.kill()


@pytest.fixture
def clinic(node_factory: Any, cloud: OrthancPeer, cups: CupsPeer) -> EdgeNode:
    return console_node(
        node_factory, cloud={"dicomweb_url": cloud.dicomweb_url}, sync={**FAST_SYNC, "enabled": True},
        reports={"enabled": True, "poll_interval_s": 600}, node={"phone": PHONE},
        console={"refresh_s": 1}, kiosk={"cups_server": cups.server, "cups_queue": "kiosk", "print_limit": 1},
    )


def kiosk_url(node: EdgeNode) -> str:
    return f"http://127.0.0.1:{tomllib.loads(node.config.read_text())['kiosk']['port']}"


def slip(desk: ConsoleClient, order_id: int) -> tuple[str, str]:
    """(code, PIN) as the registered page shows them to print the slip."""
    _, html = desk.get(f"/visits/{order_id}/registered")
    code = re.search(r'id="slip-code">([\d ]+)<', html)
    pin = re.search(r'id="slip-pin">([\d ]+)<', html)
    assert code and pin, html
    return code.group(1).replace(" ", ""), pin.group(1).replace(" ", "")


def kiosk_walk(browser: Any, url: str, code: str, pin: str) -> Any:
    """A patient at the kiosk in isiZulu: slip scanned, PIN typed; returns the page (report or not ready)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(url + "/")
    choose_language(page, "zu")
    scan(page, code)
    keypad(page, pin)
    return page


def print_it(page: Any, cups: CupsPeer) -> str:
    """Press Print, wait for the page in cups-pdf; its text (pdftotext) with runs of white space as one."""
    before = len(list(cups.pdf_dir.rglob("*.pdf")))
    page.click("#print")
    page.wait_for_selector("body[data-page=printed]", timeout=30_000)
    pdf = cups.wait_for_pdfs(before + 1)[-1]
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    return " ".join(text.split())


def check_now(tab: Any, order_id: int) -> None:
    """The technician's button on the visit's row; the console says it asked."""
    tab.click(f"tr[data-order='{order_id}'] button:has-text('Check for the report now')")
    tab.wait_for_selector("text=Asking the cloud for the report now")


def test_draft_then_signed_then_amended_report_at_the_console_and_the_kiosk(
    browser: Any, cups: CupsPeer, clinic: EdgeNode, cloud: OrthancPeer, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    desk = ConsoleClient(clinic)
    assert desk.login(TECH, TECH_PASSWORD) == 303
    order_id = desk.register(surname="Mthembu", given_names="Zanele", birth_date="1990-03-14",
                             folder_number="F-20931", language="zu")
    code, pin = slip(desk, order_id)
    accession, study_uid = query(clinic, "SELECT accession_number, study_instance_uid FROM \"order\" WHERE id = ?",
                                 order_id)[0]
    images = dx_series(tmp_path / "dr", 1, study_uid=study_uid, accession=accession, size=64)
    assert clinic.storescu(*images).returncode == 0
    wait_until(lambda: [s["sync_state"] for s in clinic.studies()] == ["synced"], what="the image in the cloud")
    image = dcmread(images[0], stop_before_pixels=True)

    tab = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    log_in(tab, clinic, TECH, TECH_PASSWORD)
    row = tab.locator(f"tr[data-order='{order_id}']")
    expect(row.locator("button", has_text="Check for the report now")).to_be_visible()

    # 1. The reader's draft: staff see it as a preliminary report; the patient is told "later today".
    reader_sr(tmp_path / "draft.dcm", image, DRAFT, verified=False, when="20261124090000")
    cloud.upload(tmp_path / "draft.dcm")
    check_now(tab, order_id)
    expect(row.locator("[data-flag=preliminary]")).to_contain_text("Preliminary report", timeout=30_000)
    expect(row.locator("[data-flag=preliminary]")).to_contain_text(DRAFT)
    shot(tab, tmp_path, "console-preliminary")
    kiosk = kiosk_url(clinic)
    patient = kiosk_walk(browser, kiosk, code, pin)
    text = main_text(patient)
    assert "Umbiko wakho awukakulungi" in text and "Udokotela ubhala umbiko wakho manje" in text
    assert "kusasa" not in text and "fracture" not in text.lower()  # no "tomorrow", no draft text
    shot(patient, tmp_path, "kiosk-not-ready")
    patient.context.close()

    # 2. The signed report: shown and printed, with every detail the page must carry.
    final = reader_sr(tmp_path / "final.dcm", image, FINAL, when="20261124120000", doctor=DOCTOR)
    cloud.upload(tmp_path / "final.dcm")
    check_now(tab, order_id)
    expect(row).to_have_attribute("data-state", "report_ready", timeout=30_000)
    expect(row.locator("[data-flag=preliminary]")).to_have_count(0)  # the signed report is newer than the draft
    patient = kiosk_walk(browser, kiosk, code, pin)
    text = main_text(patient)
    assert FINAL in text and DRAFT not in text and "Dlamini & <b>Sons</b> Thandi" in text
    assert "F-20931" in text and accession in text and "Owokugcina" in text  # folder number, accession, "Final"
    printed = print_it(patient, cups)
    for literal in ("Ikhaya Clinic", PHONE, "Inombolo yefayela", "F-20931", "1990-03-14", accession,
                    "Dlamini & <b>Sons</b> Thandi", "2026-11-24 12:00", "Owokugcina", FINAL,
                    "Umbiko kadokotela ubhalwe ngesiNgisi. Abasebenzi bomtholampilo bangakuchazela wona."):
        assert literal in printed, (literal, printed)
    patient.context.close()

    # 3. The amendment after printing: only the new report, the line that says what it replaces,
    # one print beyond the limit of 1, then no more; the console flags the visit.
    reader_sr(tmp_path / "amended.dcm", image, AMENDED, when="20261124150000", doctor="Dlamini^Thandi",
              replaces=final)
    cloud.upload(tmp_path / "amended.dcm")
    check_now(tab, order_id)
    expect(row.locator("[data-flag=amended-after-printing]")).to_contain_text("Amended after printing",
                                                                               timeout=30_000)
    shot(tab, tmp_path, "console-amended")
    patient = kiosk_walk(browser, kiosk, code, pin)
    text = main_text(patient)
    assert AMENDED in text and FINAL not in text
    assert "Umbiko olungisiwe — uthatha indawo yombiko wango-2026-11-24 12:00" in text
    assert "Olungisiwe" in text and "Imizamo" not in text
    shot(patient, tmp_path, "kiosk-amended")
    printed = print_it(patient, cups)
    assert AMENDED in printed and FINAL not in printed
    # The boxed line wraps before the time, and pdftotext may read the wrapped piece first.
    assert "Umbiko olungisiwe" in printed and "uthatha indawo yombiko wango-2026-11-24" in printed
    assert "12:00" in printed and "2026-11-24 15:00" in printed  # the replaced report's time; the amendment's
    assert qr_urls_in_pdf(sorted(cups.pdf_dir.rglob("*.pdf"))[-1], tmp_path)  # the QR still decodes
    patient.context.close()
    patient = kiosk_walk(browser, kiosk, code, pin)
    assert patient.locator("#print").count() == 0
    assert "Lo mbiko usuphrintiwe" in main_text(patient)  # the print limit, in isiZulu
    patient.context.close()

    kiosk_prints = query(clinic, "SELECT outcome, report_sop_uid FROM kiosk_audit WHERE action = 'print' ORDER BY id")
    assert [o for o, _ in kiosk_prints] == ["printed", "amended_extra", "printed"]
    assert kiosk_prints[0][1] == final.SOPInstanceUID and kiosk_prints[1][1] == kiosk_prints[2][1] != final.SOPInstanceUID
    checks = query(clinic, "SELECT user, detail FROM order_audit WHERE action = 'check_report_now'")
    assert len(checks) == 3 and all(user == TECH and "1 study" in detail for user, detail in checks)
    asked = query(clinic, "SELECT COUNT(*) FROM event_log WHERE kind = 'report_check_requested'")[0][0]
    assert asked == 3
    assert query(clinic, "SELECT COUNT(*) FROM report_poll WHERE check_requested_at IS NOT NULL")[0][0] == 0  # all answered
    tab.context.close()

