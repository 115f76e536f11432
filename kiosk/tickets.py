"""Slip tickets: the code + PIN a patient gets at registration, and the rules that guard them.

The console calls :func:`issue_ticket` when it registers a visit; the kiosk calls
:func:`look_up` with what the patient entered. Only an scrypt hash of the PIN is kept.
Wrong PINs lock the code for a while; a kiosk that keeps failing is slowed down; every
lookup and print lands in the audit log (time, code, outcome, never the PIN).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from peewee import fn

from edge.check_digit import luhn_digit, luhn_ok
from edge.secret_hash import DUMMY_HASH, hash_secret, secret_matches
from edge.store.db import write_transaction
from edge.store.models import Study, utcnow
from kiosk.const import CODE_DIGITS, COUNTED_PRINTS, FAILED_LOOKUPS
from kiosk.tables import KioskAudit, Ticket
from sync.reports import ReportView, report_for_study

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

# scrypt cost: ~16 MiB and ~50 ms per check on the box; a stolen database costs an
# attacker that much per guess, and the PIN space is small, so lockout does the real work.


@dataclass(frozen=True)
class IssuedTicket:
    """What goes on the slip. The PIN exists only here and on paper."""

    code: str
    pin: str
    expires_at: dt.datetime


@dataclass(frozen=True)
class GuardSettings:
    """The [kiosk] keys the lookup rules use (a plain object so tests and bench can set them)."""

    max_pin_failures: int = 5
    lockout_minutes: float = 15.0
    throttle_after_failures: int = 10
    throttle_window_s: float = 600.0
    throttle_max_delay_s: float = 60.0
    print_limit: int = 2
    report_estimate_hours: float = 24.0


@dataclass(frozen=True)
class Lookup:
    """What a code + PIN came to; patient details only when ``outcome`` is ready/not_ready."""

    outcome: str
    ticket_id: int | None = None
    wait_s: float = 0.0  # locked / throttled: how long until a try is worth it
    tries_left: int | None = None
    estimate_hours: float | None = None  # not_ready: plain estimate until the report comes


@dataclass(frozen=True)
class TicketReport:
    """A ready report with what the printed page needs."""

    ticket_id: int
    code: str
    patient_name: str
    exam: str
    study_uid: str
    study_date: str
    report: ReportView
    prints_left: int


# ---------------------------------------------------------------------- codes and PINs


def normalise_code(text: str) -> str | None:
    """The slip code from what was scanned or typed (spaces, dashes dropped), or None if malformed."""
    code = "".join(ch for ch in text if not ch.isspace() and ch != "-")
    if len(code) != CODE_DIGITS or not code.isdigit() or not code.isascii():
        return None
    return code if luhn_ok(code) else None


def _new_code() -> str:
    body = "".join(secrets.choice("0123456789") for _ in range(CODE_DIGITS - 1))
    return body + luhn_digit(body)




def issue_ticket(
    accession_number: str,
    patient_name: str,
    exam: str,
    *,
    pin_digits: int = 6,
    valid_days: int = 90,
) -> IssuedTicket:
    """Make a slip for a registered visit: a fresh code and PIN; only the PIN's hash is kept.

    Called by the console at registration (the store must be open). The accession number
    is what the DR puts in the study, so the kiosk finds the study and its report by it.
    """
    if not accession_number.strip() or len(accession_number) > 16:
        raise ValueError("accession number must be 1 to 16 characters")
    if not patient_name.strip():
        raise ValueError("patient name is required")
    pin = "".join(secrets.choice("0123456789") for _ in range(pin_digits))
    pin_hash = hash_secret(pin)
    now = utcnow()
    expires = now + dt.timedelta(days=valid_days)
    for _ in range(20):
        code = _new_code()
        with write_transaction():
            if Ticket.get_or_none(Ticket.code == code) is not None:
                continue
            ticket = Ticket.create(
                code=code, pin_hash=pin_hash, accession_number=accession_number.strip(),
                patient_name=patient_name.strip()[:128], exam=exam.strip()[:128],
                issued_at=now, expires_at=expires,
            )
            KioskAudit.create(action="issue", outcome="issued", code=code, ticket=ticket)
        log.info("kiosk: ticket %d issued", ticket.id)
        return IssuedTicket(code=code, pin=pin, expires_at=expires)
    raise RuntimeError("could not find a free slip code")  # 1e9 codes: practically never


# ---------------------------------------------------------------------- lookup


def client_wait_s(client: str, settings: GuardSettings, now: dt.datetime | None = None) -> float:
    """Seconds this kiosk must wait before its next try; 0 when it may go on.

    Past ``throttle_after_failures`` failed lookups in the window, each further failure
    doubles the pause (1 s, 2 s, 4 s … up to ``throttle_max_delay_s``). Read from the audit
    log, so a restart does not reset it.
    """
    now = now or utcnow()
    since = now - dt.timedelta(seconds=settings.throttle_window_s)
    failures, last = (
        KioskAudit.select(fn.COUNT(KioskAudit.id), fn.MAX(KioskAudit.at))
        .where(
            (KioskAudit.client == client)
            & (KioskAudit.action == "lookup")
            & (KioskAudit.outcome.in_(tuple(FAILED_LOOKUPS)))
            & (KioskAudit.at >= since)
        )
        .tuples()
        .get()
    )
    excess = int(failures) - settings.throttle_after_failures
    if excess < 0 or last is None:
        return 0.0
    last = last if isinstance(last, dt.datetime) else dt.datetime.fromisoformat(str(last))
    pause = min(settings.throttle_max_delay_s, 2.0**excess)
    return max(0.0, pause - (now - last).total_seconds())


def look_up(code_text: str, pin: str, client: str, settings: GuardSettings, data_dir: Path) -> Lookup:
    """Check a code + PIN under the lockout and throttle rules, and audit the attempt."""
    now = utcnow()
    code = normalise_code(code_text) or ""
    wait = client_wait_s(client, settings, now)
    if wait > 0:
        _audit_lookup(code, None, client, "throttled")
        return Lookup("throttled", wait_s=wait)
    if not code:
        _audit_lookup(code_text[:16] if code_text.isdigit() else "", None, client, "bad_code")
        return Lookup("bad_code")
    ticket = Ticket.get_or_none(Ticket.code == code)
    if ticket is None:
        secret_matches(pin, DUMMY_HASH)  # same time as a real check: no oracle for which codes exist
        _audit_lookup(code, None, client, "unknown_code")
        return Lookup("unknown_code")
    if ticket.locked_until is not None and ticket.locked_until > now:
        _audit_lookup(code, ticket.id, client, "locked")
        return Lookup("locked", ticket.id, wait_s=(ticket.locked_until - now).total_seconds())
    if not secret_matches(pin, ticket.pin_hash):
        return _wrong_pin(ticket.id, code, client, settings)
    if ticket.expires_at <= now:
        _audit_lookup(code, ticket.id, client, "expired")
        return Lookup("expired", ticket.id)
    study = _study_for(ticket.accession_number)
    ready = study is not None and report_for_study(study.study_instance_uid, data_dir) is not None
    outcome = "ready" if ready else "not_ready"
    with write_transaction():
        Ticket.update(failed_pins=0, locked_until=None).where(Ticket.id == ticket.id).execute()
        KioskAudit.create(action="lookup", outcome=outcome, code=code, ticket=ticket.id, client=client)
    log.info("kiosk: lookup from %s: %s (ticket %d)", client, outcome, ticket.id)
    if ready:
        return Lookup("ready", ticket.id)
    return Lookup("not_ready", ticket.id, estimate_hours=_estimate_hours(study, settings, now))


def _wrong_pin(ticket_id: int, code: str, client: str, settings: GuardSettings) -> Lookup:
    now = utcnow()
    with write_transaction():
        ticket = Ticket.get_by_id(ticket_id)
        failed = ticket.failed_pins + 1
        if failed >= settings.max_pin_failures:
            until = now + dt.timedelta(minutes=settings.lockout_minutes)
            Ticket.update(failed_pins=0, locked_until=until).where(Ticket.id == ticket_id).execute()
            KioskAudit.create(action="lookup", outcome="wrong_pin", code=code, ticket=ticket_id, client=client,
                              detail="code locked")
        else:
            until = None
            Ticket.update(failed_pins=failed).where(Ticket.id == ticket_id).execute()
            KioskAudit.create(action="lookup", outcome="wrong_pin", code=code, ticket=ticket_id, client=client)
    if until is not None:
        log.warning("kiosk: lookup from %s: wrong PIN, ticket %d locked until %sZ", client, ticket_id, until.isoformat(timespec="seconds"))
        return Lookup("locked", ticket_id, wait_s=settings.lockout_minutes * 60)
    log.info("kiosk: lookup from %s: wrong PIN (ticket %d, %d left)", client, ticket_id, settings.max_pin_failures - failed)
    return Lookup("wrong_pin", ticket_id, tries_left=settings.max_pin_failures - failed)


def _audit_lookup(code: str, ticket_id: int | None, client: str, outcome: str) -> None:
    with write_transaction():
        KioskAudit.create(action="lookup", outcome=outcome, code=code, ticket=ticket_id, client=client)
    log.info("kiosk: lookup from %s: %s%s", client, outcome, f" (ticket {ticket_id})" if ticket_id else "")


def _study_for(accession_number: str) -> Study | None:
    """The newest study with this accession, preferring one whose report is in."""
    return (
        Study.select()
        .where(Study.accession_number == accession_number)
        .order_by((Study.report_state == "none").asc(), Study.received_at.desc())
        .first()
    )


def _estimate_hours(study: Study | None, settings: GuardSettings, now: dt.datetime) -> float:
    """Hours until the report is likely in: the configured turnaround less time already waited."""
    if study is None:
        return settings.report_estimate_hours
    waited = (now - study.received_at).total_seconds() / 3600
    return max(1.0, settings.report_estimate_hours - waited)


# ---------------------------------------------------------------------- the ready report


def ticket_report(ticket_id: int, data_dir: Path, settings: GuardSettings) -> TicketReport | None:
    """What the preview and the printed page show, or None when the report is not (or no longer) there."""
    ticket = Ticket.get_or_none(Ticket.id == ticket_id)
    if ticket is None:
        return None
    study = _study_for(ticket.accession_number)
    if study is None:
        return None
    report = report_for_study(study.study_instance_uid, data_dir)
    if report is None:
        return None
    used = _prints_used(ticket.id, report.sop_instance_uid)
    return TicketReport(
        ticket_id=ticket.id,
        code=ticket.code,
        patient_name=ticket.patient_name,
        exam=ticket.exam,
        study_uid=study.study_instance_uid,
        study_date=study.study_date,
        report=report,
        prints_left=max(0, settings.print_limit + ticket.extra_prints - used),
    )


def _prints_used(ticket_id: int, report_sop_uid: str) -> int:
    return (
        KioskAudit.select()
        .where(
            (KioskAudit.ticket == ticket_id)
            & (KioskAudit.action == "print")
            & (KioskAudit.report_sop_uid == report_sop_uid)
            & (KioskAudit.outcome.in_(COUNTED_PRINTS))
        )
        .count()
    )


def reserve_print(ticket_id: int, report_sop_uid: str, client: str, settings: GuardSettings) -> int | None:
    """Take one print from the allowance before printing (so two taps cannot print twice).

    Returns the audit row id to finish with :func:`finish_print`, or None at the limit.
    """
    with write_transaction():
        ticket = Ticket.get_by_id(ticket_id)
        allowed = settings.print_limit + ticket.extra_prints
        if _prints_used(ticket_id, report_sop_uid) >= allowed:
            KioskAudit.create(action="print", outcome="limit_reached", code=ticket.code, ticket=ticket_id,
                              client=client, report_sop_uid=report_sop_uid)
            log.info("kiosk: print from %s refused: limit of %d reached (ticket %d)", client, allowed, ticket_id)
            return None
        row = KioskAudit.create(action="print", outcome="printing", code=ticket.code, ticket=ticket_id,
                                client=client, report_sop_uid=report_sop_uid)
    return int(row.id)


def finish_print(audit_id: int, outcome: str, job: str = "", detail: str = "", study_uid: str = "") -> None:
    """Record how a reserved print ended; a printed report's study becomes ``printed``."""
    with write_transaction():
        KioskAudit.update(outcome=outcome, job=job[:64], detail=detail[:500]).where(KioskAudit.id == audit_id).execute()
        if outcome == "printed" and study_uid:
            Study.update(report_state="printed", updated_at=utcnow()).where(
                Study.study_instance_uid == study_uid
            ).execute()


def allow_reprint(code_text: str, by: str = "technician", count: int = 1) -> int:
    """A technician lets the patient print once more; returns the prints now allowed beyond the limit."""
    code = normalise_code(code_text)
    if code is None:
        raise LookupError("that is not a slip code (10 digits, as printed under the barcode)")
    with write_transaction():
        ticket = Ticket.get_or_none(Ticket.code == code)
        if ticket is None:
            raise LookupError("no slip with that code on this node")
        extra = ticket.extra_prints + count
        Ticket.update(extra_prints=extra, locked_until=None, failed_pins=0).where(Ticket.id == ticket.id).execute()
        KioskAudit.create(action="reprint_allowed", outcome="allowed", code=code, ticket=ticket.id, client=by[:64],
                          detail=f"+{count}")
    log.info("kiosk: %d more print(s) allowed for ticket %d by %s", count, ticket.id, by)
    return extra
