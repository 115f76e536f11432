"""The printed report page (A4 PDF), a medical document the patient takes home.

The clinic's name and phone and the report's status (Final / Amended) head it; an
amendment says, boxed, which report it replaces; then the patient's name with a second
identifier (SA ID or folder number, date of birth), accession, exam and study date, who
reported and when it was signed; the reader's report (its headings in the patient's language); a note in the patient's language
that the report is written in English and staff can explain it; the QR code to the cloud
film with its caption. A reader's PDF report is merged in after it as pages (pypdf).
Every value goes through :mod:`kiosk.page_text`, so none is read as ReportLab markup.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass

from pypdf import PdfReader, PdfWriter
from reportlab.lib.colors import Color, HexColor
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import Flowable, HRFlowable, KeepTogether, SimpleDocTemplate, Spacer, Table, TableStyle

from kiosk.fonts import page_fonts
from kiosk.i18n import Catalog
from kiosk.page_text import paragraph, plain
from kiosk.patient_texts import report_headings
from kiosk.qr import QRFlowable
from sync.reports import ReportView, parse_dicom_datetime

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
    clinic_phone: str = ""  # [node] phone
    accession_number: str = ""
    patient_ids: tuple[tuple[str, str], ...] = ()  # (catalog key of the label, value): SA ID / folder number, birth date
    replaces_report_of: dt.datetime | None = None  # an amendment: when the report it replaces was signed

    def facts(self, t: Catalog) -> list[tuple[str, str]]:
        """(label, value) for the details block, in reading order; the A4 page and the receipt share it."""
        rows = [(t("patient"), self.patient_name)]
        rows += [(t(key), readable_date(value) if key == "birth_date" else value) for key, value in self.patient_ids]
        rows += [(t("accession"), self.accession_number or "-"), (t("exam"), self.exam or "-"),
                 (t("date"), readable_date(self.study_date)),
                 (t("reading_doctor"), self.report.reading_doctor or "-"),
                 (t("verified_at"), readable_datetime(self.report.verified_at or self.report.content_datetime)),
                 (t("status"), self.status_text(t))]
        return rows

    def status_text(self, t: Catalog) -> str:
        return t(f"status_{self.report.status}")

    def amended_text(self, t: Catalog) -> str:
        """"Amended report — replaces the report of <date>", or "" for a report that replaces none."""
        if self.report.status != "amended":
            return ""
        when = self.replaces_report_of
        return t("amended_replaces", date=when.strftime("%Y-%m-%d %H:%M") if when is not None else "-")


DATE_CHARS = 24  # a DA that is not YYYYMMDD is shown as it came, up to this long


def readable_date(dicom_date: str) -> str:
    """YYYYMMDD as YYYY-MM-DD: one form every language reads the same.

    Anything else is shown as it came (shortened): it is still text from a DICOM header,
    so the page and receipt put it through :mod:`kiosk.page_text` like every value.
    """
    if len(dicom_date) == 8 and dicom_date.isdigit() and dicom_date.isascii():
        return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:]}"
    return dicom_date.strip()[:DATE_CHARS] or "-"


def readable_datetime(dicom_datetime: str) -> str:
    """A DICOM DT (or DA+TM) as YYYY-MM-DD HH:MM on the reader's clock; "-" when there is none."""
    when = parse_dicom_datetime(dicom_datetime)
    if when is None:
        return dicom_datetime.strip()[:DATE_CHARS] or "-"
    return when.strftime("%Y-%m-%d %H:%M")


def _styles() -> dict[str, ParagraphStyle]:
    regular, bold = page_fonts()
    return {
        "clinic": ParagraphStyle("clinic", fontName=bold, fontSize=20, leading=24),
        "contact": ParagraphStyle("contact", fontName=regular, fontSize=11, leading=14, textColor=HexColor("#333333")),
        "badge": ParagraphStyle("badge", fontName=bold, fontSize=13, leading=16, alignment=1),
        "banner": ParagraphStyle("banner", fontName=bold, fontSize=12, leading=15),
        "title": ParagraphStyle("title", fontName=bold, fontSize=14, leading=18, textColor=HexColor("#222222")),
        "label": ParagraphStyle("label", fontName=regular, fontSize=9, leading=11, textColor=HexColor("#555555")),
        "value": ParagraphStyle("value", fontName=bold, fontSize=12, leading=15),
        "body": ParagraphStyle("body", fontName=regular, fontSize=12, leading=16),
        "note": ParagraphStyle("note", fontName=bold, fontSize=11.5, leading=15),
        "qr_text": ParagraphStyle("qr_text", fontName=regular, fontSize=11, leading=14),
        "small": ParagraphStyle("small", fontName=regular, fontSize=9, leading=11, textColor=HexColor("#555555")),
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


GRID = HexColor("#999999")
SHADE = HexColor("#eeeeee")


def _header(page: ReportPage, t: Catalog, s: dict[str, ParagraphStyle]) -> Table:
    """Clinic name and phone on the left, the report's status boxed on the right."""
    clinic: list[Flowable] = [paragraph(page.clinic_name, s["clinic"])]
    if page.clinic_phone.strip():
        clinic.append(paragraph(f"{t('clinic_phone')}: {page.clinic_phone}", s["contact"]))
    clinic.append(paragraph(t("report_heading"), s["contact"]))
    return Table(
        [[clinic, paragraph(page.status_text(t), s["badge"])]],
        colWidths=[None, 48 * mm],
        style=TableStyle([
            ("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (0, 0), 0),
            ("BOX", (1, 0), (1, 0), 1.5, HexColor("#000000")), ("VALIGN", (1, 0), (1, 0), "MIDDLE"),
            ("TOPPADDING", (1, 0), (1, 0), 6), ("BOTTOMPADDING", (1, 0), (1, 0), 6),
        ]),
    )


def _facts(page: ReportPage, t: Catalog, s: dict[str, ParagraphStyle]) -> Table:
    """The details as a form: two boxed cells a row, each a small label over its value."""
    cells = [[paragraph(label, s["label"]), paragraph(value, s["value"])] for label, value in page.facts(t)]
    if len(cells) % 2:
        cells.append([])
    return Table(
        [cells[i:i + 2] for i in range(0, len(cells), 2)],
        colWidths=["50%", "50%"],
        style=TableStyle([
            ("VALIGN", (0, 0), (-1, -1), "TOP"), ("GRID", (0, 0), (-1, -1), 0.5, GRID),
            ("TOPPADDING", (0, 0), (-1, -1), 3), ("BOTTOMPADDING", (0, 0), (-1, -1), 5),
        ]),
    )


def _boxed(content: list[Flowable], background: Color, border: float = 0.8) -> Table:
    return Table([[content]], colWidths=["100%"], style=TableStyle([
        ("BOX", (0, 0), (-1, -1), border, HexColor("#000000")), ("TOPPADDING", (0, 0), (-1, -1), 6),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 7), ("LEFTPADDING", (0, 0), (-1, -1), 8),
        ("BACKGROUND", (0, 0), (-1, -1), background),
    ]))


def _film(page: ReportPage, t: Catalog, s: dict[str, ParagraphStyle]) -> Flowable:
    """The QR with its caption and expiry beside it, kept together on one page."""
    words = [paragraph(t("qr_caption"), s["qr_text"]), Spacer(1, 3 * mm),
             paragraph(t("qr_expires", date=page.link_expires.isoformat()), s["qr_text"])]
    table = Table([[QRFlowable(page.viewer_url, QR_SIZE), words]], colWidths=[QR_SIZE + 6 * mm, None],
                  style=TableStyle([("VALIGN", (0, 0), (-1, -1), "MIDDLE"), ("LEFTPADDING", (0, 0), (0, 0), 0),
                                    ("BOX", (0, 0), (-1, -1), 0.5, GRID)]))
    return KeepTogether([table])


def render_report_pdf(page: ReportPage, t: Catalog) -> bytes:
    """The page as PDF bytes; labels in the patient's language, the report as the reader wrote it."""
    s = _styles()
    story: list[Flowable] = [_header(page, t, s), Spacer(1, 3 * mm),
                             HRFlowable(width="100%", thickness=1.5, color=HexColor("#000000")), Spacer(1, 3 * mm)]
    amended = page.amended_text(t)
    if amended:
        story += [_boxed([paragraph(amended, s["banner"])], SHADE, border=1.5), Spacer(1, 3 * mm)]
    story += [_facts(page, t, s), Spacer(1, 6 * mm), paragraph(t("report_heading"), s["title"]), Spacer(1, 2 * mm)]
    if page.report.kind == "sr" and page.report.text.strip():
        story += _report_lines(report_headings(page.report.text, t), s["body"])
    else:
        story.append(paragraph(t("report_follows"), s["body"]))
    story += [Spacer(1, 7 * mm), _boxed([paragraph(t("language_note"), s["note"])], SHADE), Spacer(1, 6 * mm),
              _film(page, t, s)]
    printed = page.printed_at.strftime("%Y-%m-%d %H:%M")
    contact = " · ".join(v for v in (page.clinic_name, page.clinic_phone.strip(), t("printed_on", date=printed)) if v)

    def footer(canvas: Canvas, doc: SimpleDocTemplate) -> None:
        canvas.saveState()
        canvas.setFont(page_fonts()[0], 8)
        canvas.drawString(18 * mm, 10 * mm, plain(contact))
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
