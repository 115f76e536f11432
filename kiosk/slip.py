"""The patient slip (A6 PDF) the console prints at registration: the code as a barcode the
kiosk's scanner reads, the PIN, and where to collect the report."""

from __future__ import annotations

import datetime as dt
import io

from reportlab.graphics.barcode.code128 import Code128
from reportlab.lib.pagesizes import A6
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import Flowable, Frame

from kiosk.fonts import page_fonts
from kiosk.i18n import load_catalog
from kiosk.page_text import paragraph, plain
from kiosk.patient_texts import PatientTexts


def group_code(code: str) -> str:
    """``1234567890`` as ``123 456 7890``: easier to read out and type."""
    return f"{code[:3]} {code[3:6]} {code[6:]}"


def render_slip(
    code: str,
    pin: str,
    clinic_name: str,
    collect_at: str | dict[str, str],
    expires_at: dt.datetime | dt.date | None = None,
    language: str = "en",
) -> bytes:
    """One slip as PDF bytes. No patient name on it: a lost slip tells a finder nothing.

    ``language`` picks the catalog for the words (en, zu, xh, af, st); ``collect_at`` is
    ``[kiosk] collect_at`` ("" = the catalog's words, or one text per language).
    """
    t = load_catalog(language)
    regular, bold = page_fonts()
    width, height = A6
    buffer = io.BytesIO()
    c = Canvas(buffer, pagesize=A6)
    c.setTitle(plain(t("slip_title")))
    margin = 8 * mm
    y = height - margin
    clinic, size = plain(clinic_name[:40]), 13.0
    while size > 7 and c.stringWidth(clinic, bold, size) > width - 2 * margin:  # a long name still fits
        size -= 0.5
    c.setFont(bold, size)
    c.drawString(margin, y - 12, clinic)
    c.setFont(regular, 11)
    c.drawString(margin, y - 28, plain(t("slip_title")))
    barcode = Code128(code, barWidth=0.42 * mm, barHeight=18 * mm, quiet=True, lquiet=6 * mm, rquiet=6 * mm)
    bx = (width - barcode.width) / 2
    barcode.drawOn(c, bx, y - 36 - 18 * mm)
    y = y - 36 - 18 * mm - 8 * mm
    c.setFont(bold, 16)
    c.drawCentredString(width / 2, y, group_code(code))
    y -= 12 * mm
    c.setFont(regular, 11)
    c.drawString(margin, y, plain(t("pin_label")))
    c.setFont(bold, 24)
    c.drawString(margin + 18 * mm, y - 2, " ".join(pin))
    y -= 6 * mm
    style = ParagraphStyle("slip", fontName=regular, fontSize=9, leading=11.5)
    place = PatientTexts.of(collect_at).collect_place(language)
    lines = [t("slip_how"), t("slip_collect", place=place), t("slip_private")]
    if expires_at is not None:
        day = expires_at.date() if isinstance(expires_at, dt.datetime) else expires_at
        lines.append(t("slip_expires", date=day.isoformat()))
    story: list[Flowable] = [paragraph(line, style) for line in lines]
    Frame(margin, margin, width - 2 * margin, y - margin, leftPadding=0, rightPadding=0, showBoundary=0).addFromList(story, c)
    c.showPage()
    c.save()
    return buffer.getvalue()
