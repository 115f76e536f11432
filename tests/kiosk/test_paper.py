"""What comes out on paper, read back: the slip's barcode, the merged reader's PDF, the ESC/POS receipt, the token."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
import time
from pathlib import Path

import jwt
import pytest
from pypdf import PdfReader

from kiosk.i18n import load_catalog
from kiosk.receipt import render_receipt
from kiosk.report_pdf import ReportPage, render_report_pdf
from kiosk.slip import render_slip
from kiosk.viewer_token import KeyFileError, TokenError, load_or_create_key, make_token, verify_token, viewer_url
from sync.reports import ReportView
from tests.kiosk.helpers import escpos_qr_payloads, qr_urls_in_pdf
from tests.sync.test_dicomweb import tiny_pdf

TEMPLATE = "https://viewer.example/viewer?StudyInstanceUIDs={study_uid}&token={token}"
STUDY = "1.2.826.0.1.3680043.8.498.1"


def report(kind: str, tmp_path: Path) -> ReportView:
    pdf_path = None
    if kind == "pdf":
        pdf_path = tmp_path / "reader.pdf"
        pdf_path.write_bytes(tiny_pdf("Reader PDF body"))
    return ReportView(STUDY, "1.2.3.4", kind, "Finding: Normal chest." if kind == "sr" else "", pdf_path,
                      tmp_path / "r.dcm", "COMPLETE", "VERIFIED", "20261124101500", dt.datetime(2026, 11, 24))


def page_for(kind: str, tmp_path: Path, url: str = "https://viewer.example/x") -> ReportPage:
    return ReportPage("Ikhaya Clinic", "Zanele Mthembu-Ëlse", "Chest X-ray", "20261123", report(kind, tmp_path), url,
                      dt.date(2026, 12, 24), dt.datetime(2026, 11, 24, 9, 0))


def test_slip_barcode_scans_back_to_the_code(tmp_path: Path) -> None:
    pdf = tmp_path / "slip.pdf"
    pdf.write_bytes(render_slip("4929140009", "482913", "Ikhaya Clinic", "the kiosk at reception",
                                dt.date(2027, 2, 1), "xh"))
    subprocess.run(["pdftoppm", "-r", "200", "-png", str(pdf), str(tmp_path / "slip")], check=True)
    png = next(tmp_path.glob("slip*.png"))
    decoded = subprocess.run(["zbarimg", "--raw", "-q", str(png)], capture_output=True, text=True).stdout.split()
    assert decoded == ["4929140009"]
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True).stdout
    assert "482913" in text.replace(" ", "") and "492 914 0009" in text and "Isiliphu sakho sengxelo" in text


def test_readers_pdf_report_is_merged_after_our_page_with_the_qr(tmp_path: Path) -> None:
    url = viewer_url(TEMPLATE, STUDY, "abc.def.ghi")
    pdf = tmp_path / "page.pdf"
    pdf.write_bytes(render_report_pdf(page_for("pdf", tmp_path, url), load_catalog("af")))
    reader = PdfReader(pdf)
    assert len(reader.pages) == 2
    first = reader.pages[0].extract_text()
    assert "Ikhaya Clinic" in first and "Zanele Mthembu-Ëlse" in first and "Pasiënt" in first
    assert "Reader PDF body" in reader.pages[1].extract_text()
    assert reader.pages[0].mediabox.width == pytest.approx(595.27, abs=0.1)  # A4
    assert qr_urls_in_pdf(pdf, tmp_path) == [url]


def test_escpos_receipt_carries_the_native_qr_command_with_the_url(tmp_path: Path) -> None:
    key = b"k" * 32
    url = viewer_url(TEMPLATE, STUDY, make_token(key, STUDY, "clinic-0001", 30))
    data = render_receipt(page_for("sr", tmp_path, url), load_catalog("st"))
    assert escpos_qr_payloads(data) == [url]
    assert b"\x1d(k\x03\x001E1" in data  # error correction M
    assert b"Tlaleho ya ngaka" in data and b"Finding: Normal chest." in data
    assert data.endswith(b"\x1dV\x00")  # cut


def test_token_is_a_standard_hs256_jwt_that_expires_and_names_one_study(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "var")
    key_file = tmp_path / "var/kiosk/viewer-token.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key) == 32
    assert load_or_create_key(tmp_path / "var") == key  # made once, then reused
    token = make_token(key, STUDY, "clinic-0001", days=30)
    claims = jwt.decode(token, key, algorithms=["HS256"], issuer="clinic-0001")  # any JWT library verifies it
    assert claims["sub"] == STUDY and claims["exp"] - claims["iat"] == 30 * 86400
    assert verify_token(token, key, STUDY).node_id == "clinic-0001"
    with pytest.raises(TokenError, match="another study"):
        verify_token(token, key, "1.2.3")
    with pytest.raises(TokenError, match="signature"):
        verify_token(token, b"x" * 32)
    head, body, sig = token.split(".")
    with pytest.raises(TokenError, match="signature"):
        verify_token(f"{head}.{body[:-2]}AA.{sig}", key)
    old = make_token(key, STUDY, "clinic-0001", days=1, now=time.time() - 2 * 86400)
    with pytest.raises(TokenError, match="expired"):
        verify_token(old, key)
    key_file.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        load_or_create_key(tmp_path / "var")
