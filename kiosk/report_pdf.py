"""The printed report page (A4 PDF): clinic, patient, exam, date, the reader's report, and
the QR code to the cloud film. A reader's PDF report is merged in as pages (pypdf)."""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass

from pypdf import PdfReader, PdfWriter
from reportlab.lib.colors import HexColor
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.platypus import Flowable, HRFlowable, SimpleDocTemplate, Spacer, Table, TableStyle

from kiosk.fonts import page_fonts
from kiosk.i18n import Catalog
from kiosk.page_text import paragraph, plain
from kiosk.qr import QRFlowable
from sync.reports import ReportView

QR_SIZE = 46 * mm


@dataclass(frozen=True)
class ReportPage:
    """Everything on the printed page; built by the kiosk from the ticket and the stored report."""

    clinic_name: str
    patient_name: str
    exam: str
    study_date: str  # DICOM DA (YYYYMMDD) or ""
    report: ReportView
    viewer_url: str
    link_expires: dt.date
    printed_at: dt.datetime


DATE_CHARS = 24  # a DA that is not YYYYMMDD is shown as it came, up to this long


def readable_date(dicom_date: str) -> str:
    """YYYYMMDD as YYYY-MM-DD: one form every language reads the same.

    Anything else is shown as it came (shortened): it is still text from a DICOM header,
    so the page and receipt put it through :mod:`kiosk.page_text` like every value.
    """
    if len(dicom_date) == 8 and dicom_date.isdigit() and dicom_date.isascii():
        return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:]}"
    return dicom_date.strip()[:DATE_CHARS] or "-"


def _styles() -> dict[str, ParagraphStyle]:
    regular, bold = page_fonts()
    return {
        "clinic": ParagraphStyle("clinic", fontName=bold, fontSize=20, leading=24),
        "title": ParagraphStyle("title", fontName=bold, fontSize=14, leading=18, textColor=HexColor("#333333")),
        "label": ParagraphStyle("label", fontName=regular, fontSize=10, leading=13, textColor=HexColor("#444444")),
        "value": ParagraphStyle("value", fontName=bold, fontSize=13, leading=16),
        "body": ParagraphStyle("body", fontName=regular, fontSize=11.5, leading=15),
        "caption": ParagraphStyle("caption", fontName=regular, fontSize=9, leading=11, alignment=1),
        "small": ParagraphStyle("small", fontName=regular, fontSize=8, leading=10, textColor=HexColor("#555555")),
    }


MAX_DEPTH = 8  # deeper SR nesting is drawn at this indent, so text keeps a readable width
PARAGRAPH_CHARS = 1500  # ReportLab lays out a long paragraph in quadratic time: longer lines go in pieces


def _report_lines(text: str, style: ParagraphStyle) -> list[Flowable]:
    """The SR text line by line, keeping its indentation (content tree depth)."""
    out: list[Flowable] = []
    for line in text.splitlines():
        if not line.strip():
            out.append(Spacer(1, 5))
            continue
        depth = min(MAX_DEPTH, (len(line) - len(line.lstrip(" "))) // 2)
        indented = ParagraphStyle(f"indent{depth}", parent=style, leftIndent=depth * 6 * mm)
        out += [paragraph(piece, indented) for piece in _pieces(line.strip())]
    return out


def _pieces(line: str) -> list[str]:
    """``line`` cut at spaces into pieces of at most PARAGRAPH_CHARS (a word longer than that is cut)."""
    pieces = []
    while len(line) > PARAGRAPH_CHARS:
        cut = line.rfind(" ", 0, PARAGRAPH_CHARS + 1)
        cut = cut if cut > 0 else PARAGRAPH_CHARS
        pieces.append(line[:cut])
        line = line[cut:].lstrip(" ")
    return [*pieces, line] if line else pieces


def render_report_pdf(page: ReportPage, t: Catalog) -> bytes:
    """The page as PDF bytes; labels in the patient's language, the report as the reader wrote it."""
    s = _styles()
    info = Table(
        [
            [paragraph(t("patient"), s["label"]), paragraph(page.patient_name, s["value"])],
            [paragraph(t("exam"), s["label"]), paragraph(page.exam or "-", s["value"])],
            [paragraph(t("date"), s["label"]), paragraph(readable_date(page.study_date), s["value"])],
        ],
        colWidths=[28 * mm, None],
        style=TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("BOTTOMPADDING", (0, 0), (-1, -1), 5)]),
    )
    qr_cell = [
        QRFlowable(page.viewer_url, QR_SIZE),
        paragraph(t("qr_caption"), s["caption"]),
        paragraph(t("qr_expires", date=page.link_expires.isoformat()), s["caption"]),
    ]
    top = Table(
        [[[paragraph(page.clinic_name, s["clinic"]), Spacer(1, 8 * mm), info], qr_cell]],
        colWidths=[None, QR_SIZE + 6 * mm],
        style=TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0)]),
    )
    story: list = [top, Spacer(1, 5 * mm), HRFlowable(width="100%", thickness=1.2, color=HexColor("#000000")),
                   Spacer(1, 4 * mm), paragraph(t("report_heading"), s["title"]), Spacer(1, 3 * mm)]
    if page.report.kind == "sr" and page.report.text.strip():
        story += _report_lines(page.report.text, s["body"])
    else:
        story.append(paragraph(t("report_follows"), s["body"]))
    printed = page.printed_at.strftime("%Y-%m-%d %H:%M")

    def footer(canvas, doc) -> None:  # type: ignore[no-untyped-def]
        canvas.saveState()
        canvas.setFont(page_fonts()[0], 8)
        canvas.drawString(18 * mm, 10 * mm, plain(f"{page.clinic_name} · {printed}"))
        canvas.drawRightString(A4[0] - 18 * mm, 10 * mm, str(doc.page))
        canvas.restoreState()

    buffer = io.BytesIO()
    doc = SimpleDocTemplate(buffer, pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm, topMargin=16 * mm,
                            bottomMargin=18 * mm, title=plain(t("report_heading")), author=plain(page.clinic_name))
    doc.build(story, onFirstPage=footer, onLaterPages=footer)
    if page.report.kind == "pdf" and page.report.pdf_path is not None:
        return merge_reader_pdf(buffer.getvalue(), page.report.pdf_path.read_bytes())
    return buffer.getvalue()


def merge_reader_pdf(cover: bytes, reader_pdf: bytes) -> bytes:
    """Our page first, then the reader's own PDF pages as they are."""
    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(cover)))
    writer.append(PdfReader(io.BytesIO(reader_pdf)))
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def pdf_page_count(path_bytes: bytes) -> int:
    return len(PdfReader(io.BytesIO(path_bytes)).pages)
