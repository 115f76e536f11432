"""What comes out on paper, read back: the slip's barcode, the merged reader's PDF, the ESC/POS receipt, the token."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pypdf import PdfReader

from kiosk.i18n import load_catalog
from kiosk.receipt import render_receipt
from kiosk.report_pdf import ReportPage, render_report_pdf
from kiosk.slip import render_slip
from kiosk.viewer_token import make_token, viewer_url
from sync.reports import ReportView
from tests.dicom_factory import tiny_pdf
from tests.kiosk.helpers import escpos_qr_payloads, qr_urls_in_pdf

TEMPLATE = "https://film.example/film/{token}"
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
    key = Ed25519PrivateKey.generate()
    url = viewer_url(TEMPLATE, STUDY, make_token(key, STUDY, "clinic-0001", 30))
    data = render_receipt(page_for("sr", tmp_path, url), load_catalog("st"))
    assert escpos_qr_payloads(data) == [url]
    assert b"\x1d(k\x03\x001E1" in data  # error correction M
    st = load_catalog("st")
    assert b"Tlaleho ya ngaka" in data and f"{st('sr_finding')}: Normal chest.".encode() in data
    assert data.endswith(b"\x1dV\x00")  # cut
