"""One print of a ready report: allowance taken, page built (QR with a fresh token), job submitted, audited."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.store.models import utcnow
from kiosk import metrics
from kiosk.i18n import load_catalog
from kiosk.patient_texts import PatientTexts
from kiosk.printing import PrinterBackend, PrintResult
from kiosk.report_pdf import ReportPage
from kiosk.tickets import GuardSettings, TicketReport, finish_print, reserve_print, ticket_report
from kiosk.viewer_token import make_token, viewer_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilmLink:
    """How the QR's URL is made: the [kiosk] template, the node's key and id, the lifetime."""

    template: str
    key: Ed25519PrivateKey
    node_id: str
    token_days: int

    def url(self, study_uid: str, now: float | None = None) -> tuple[str, dt.date]:
        issued = time.time() if now is None else now
        token = make_token(self.key, study_uid, self.node_id, self.token_days, now=issued)
        expires = dt.datetime.fromtimestamp(issued + self.token_days * 86400, dt.UTC).date()
        return viewer_url(self.template, study_uid, token), expires


@dataclass(frozen=True)
class PrintOutcome:
    outcome: str  # printed | failed | limit_reached | printer_unavailable | gone
    audit_id: int | None = None
    job: str = ""
    study_uid: str = ""


def build_page(report: TicketReport, clinic_name: str, link: FilmLink | None, clinic_phone: str = "",
               exam: str | None = None) -> ReportPage:
    """The page for ``report``; ``link`` None for the screen's preview, which shows no QR (no token is made);
    ``exam``: the exam's name in the patient's language (:mod:`kiosk.patient_texts`), else as the ticket has it."""
    url, expires = link.url(report.study_uid) if link is not None else ("", utcnow().date())
    return ReportPage(
        clinic_name=clinic_name,
        patient_name=report.patient_name,
        exam=report.exam if exam is None else exam,
        study_date=report.study_date,
        report=report.report,
        viewer_url=url,
        link_expires=expires,
        printed_at=utcnow(),
        clinic_phone=clinic_phone,
        accession_number=report.accession_number,
        patient_ids=report.patient_ids,
        replaces_report_of=report.replaces_report_of,
    )


def print_ticket_report(
    ticket_id: int,
    client: str,
    language: str,
    printer: PrinterBackend,
    settings: GuardSettings,
    data_dir: Path,
    clinic_name: str,
    link: FilmLink,
    clinic_phone: str = "",
    texts: PatientTexts | None = None,
) -> PrintOutcome:
    """Print the ticket's report once, within its allowance. Blocking: run it off the event loop."""
    started = time.monotonic()
    report = ticket_report(ticket_id, data_dir, settings)
    if report is None:
        return PrintOutcome("gone")
    audit_id = reserve_print(ticket_id, report.report.sop_instance_uid, client, settings, report.amended_extra)
    if audit_id is None:
        metrics.PRINTS.labels("limit_reached").inc()
        return PrintOutcome("limit_reached")
    state = printer.state()
    if state in ("offline", "paper_out"):
        finish_print(audit_id, "printer_unavailable", detail=f"printer {state}")
        metrics.PRINTS.labels("printer_unavailable").inc()
        log.warning("kiosk: print for ticket %d not sent: printer %s", ticket_id, state)
        return PrintOutcome("printer_unavailable", audit_id)
    result: PrintResult
    try:
        exam = (texts or PatientTexts()).exam(report.exam, language)
        document = printer.render(build_page(report, clinic_name, link, clinic_phone, exam), load_catalog(language))
        result = printer.submit(document)
    except Exception as exc:  # a broken report file or renderer bug: the patient goes to reception
        log.exception("kiosk: print for ticket %d failed while rendering", ticket_id)
        result = PrintResult(False, state="job_failed", detail=f"render: {type(exc).__name__}: {exc}")
    outcome = "printed" if result.ok else "failed"
    finish_print(audit_id, outcome, result.job, result.detail, report.study_uid)
    metrics.PRINTS.labels(outcome).inc()
    elapsed = time.monotonic() - started
    if result.ok:
        metrics.PRINT_SECONDS.observe(elapsed)
        log.info("kiosk: ticket %d printed on %s as %s in %.2f s", ticket_id, printer.name, result.job, elapsed)
    else:
        log.warning("kiosk: print for ticket %d failed on %s: %s", ticket_id, printer.name, result.detail)
    return PrintOutcome(outcome, audit_id, result.job, report.study_uid)
