"""The report as an 80 mm ESC/POS receipt (python-escpos), with the printer's own QR command."""

from __future__ import annotations

import textwrap

from escpos.printer import Dummy

from kiosk.i18n import Catalog
from kiosk.page_text import plain
from kiosk.patient_texts import report_headings
from kiosk.report_pdf import ReportPage

COLUMNS = 48  # font A on 80 mm paper (72 mm printable at 203 dpi)


def render_receipt(page: ReportPage, t: Catalog) -> bytes:
    """The ESC/POS byte stream for one receipt; the caller sends it to the device."""
    p = Dummy()
    p.set(align="center", bold=True, double_height=True, double_width=True)
    p.text(_wrap(page.clinic_name, COLUMNS // 2) + "\n")
    p.set(align="center", bold=False, normal_textsize=True)
    if page.clinic_phone.strip():
        p.text(_wrap(f"{t('clinic_phone')}: {page.clinic_phone}", COLUMNS) + "\n")
    p.set(align="center", bold=True, normal_textsize=True)
    p.text(_wrap(f"{t('report_heading')}: {page.status_text(t)}", COLUMNS) + "\n\n")
    amended = page.amended_text(t)
    if amended:
        p.set(align="left", bold=True, normal_textsize=True)
        p.text("*" * COLUMNS + "\n" + _wrap(amended, COLUMNS) + "\n" + "*" * COLUMNS + "\n")
    p.set(align="left", bold=False, normal_textsize=True)
    for label, value in page.facts(t):
        p.text(_wrap(f"{label}: {value}", COLUMNS) + "\n")
    p.text("-" * COLUMNS + "\n")
    p.set(bold=True)
    p.text(_wrap(t("report_heading"), COLUMNS) + "\n")
    p.set(bold=False)
    if page.report.kind == "sr" and page.report.text.strip():
        for line in report_headings(page.report.text, t).splitlines():
            indent = " " * min(COLUMNS // 3, len(line) - len(line.lstrip(" ")))
            p.text((textwrap.fill(plain(line.strip()), COLUMNS, initial_indent=indent, subsequent_indent=indent)
                    or "") + "\n")
    else:
        p.text(_wrap(t("receipt_pdf_note"), COLUMNS) + "\n")
    p.text("-" * COLUMNS + "\n")
    p.set(bold=True)
    p.text(_wrap(t("language_note"), COLUMNS) + "\n")
    p.set(bold=False)
    p.text("\n")
    p.set(align="center")
    p.qr(page.viewer_url, native=True, size=6, ec=1)  # ec=1: level M, as on the A4 page
    p.text(_wrap(t("qr_caption"), COLUMNS) + "\n")
    p.text(_wrap(t("qr_expires", date=page.link_expires.isoformat()), COLUMNS) + "\n")
    p.text(_wrap(t("printed_on", date=page.printed_at.strftime("%Y-%m-%d %H:%M")), COLUMNS) + "\n\n")
    p.set(align="left")
    p.cut()
    return bytes(p.output)


def _wrap(text: str, width: int) -> str:
    """One value as wrapped lines, control characters gone: a DICOM value cannot send printer commands."""
    return textwrap.fill(plain(text), width) if text else ""
