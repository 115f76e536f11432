"""Slip tickets: the code + PIN a patient gets at registration, and the rules that guard them.

The console calls :func:`issue_ticket` when it registers a visit; the kiosk calls
:func:`look_up` with what the patient entered. Only an scrypt hash of the PIN is kept.
Wrong PINs lock the code for a while (any code typed, issued or not, so the kiosk never
tells which codes exist); a kiosk, or the node as a whole, that keeps failing is slowed
down; every lookup and print lands in the audit log (time, code, outcome, never the PIN).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from peewee import Expression, fn

from edge.check_digit import luhn_digit, luhn_ok
from edge.orders.tables import Order, Visit
from edge.secret_hash import DUMMY_HASH, hash_secret, secret_matches
from edge.store.const import ReportState, SyncState
from edge.store.db import write_transaction
from edge.store.models import Instance, Outbox, Study, utcnow
from edge.store.rows import row
from kiosk.const import CODE_DIGITS, COUNTED_PRINTS, FAILED_LOOKUPS, PIN_FAILURES_KEPT_DAYS, NotReady
from kiosk.tables import KioskAudit, PinGuard, Ticket
from sync.reports import ReportView, amended_after_printing, amendment_of, current_report, preliminary_report

log = logging.getLogger(__name__)

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
    throttle_node_failures: int = 30
    print_limit: int = 2
    report_estimate_hours: float = 24.0
    print_preliminary: bool = False  # [kiosk] print_preliminary: never, by default, an unverified report


@dataclass(frozen=True)
class Lookup:
    """What a code + PIN came to; patient details only when ``outcome`` is ready/not_ready."""

    outcome: str
    ticket_id: int | None = None  # only once the PIN was right
    wait_s: float = 0.0  # locked / throttled: how long until a try is worth it
    tries_left: int | None = None
    estimate_hours: float | None = None  # not_ready: plain estimate until the report comes
    wait: NotReady = "uploading"  # not_ready: where the report is, for an honest "come back" (pages.not_ready_text)


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
    accession_number: str = ""
    patient_ids: tuple[tuple[str, str], ...] = ()  # (catalog key of the label, value): the second identifier
    replaces_report_of: dt.datetime | None = None  # an amendment: when the report it replaces was signed
    amended_extra: bool = False  # the replaced report was printed: one print beyond the limit


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


def reissue_ticket(
    accession_number: str,
    patient_name: str,
    exam: str,
    *,
    by: str,
    pin_digits: int = 6,
    valid_days: int = 90,
) -> IssuedTicket:
    """A patient lost the slip: every slip of the visit stops working now, and a new code + PIN is made.

    The old slips are revoked (expired at once, audited ``reissue``/``revoked``) before the
    new one exists, so no moment has two working slips. The new slip starts with its own
    print allowance, like a first one.
    """
    now = utcnow()
    with write_transaction():
        old = list(Ticket.select(Ticket.id, Ticket.code).where(
            Ticket.accession_number == accession_number.strip(), Ticket.expires_at > now))
        for ticket in old:
            Ticket.update(expires_at=now).where(Ticket.id == ticket.id).execute()
            KioskAudit.create(action="reissue", outcome="revoked", code=ticket.code, ticket=ticket.id,
                              client=by[:64], detail="a new slip was made for the visit", at=now)
    issued = issue_ticket(accession_number, patient_name, exam, pin_digits=pin_digits, valid_days=valid_days)
    with write_transaction():
        new = Ticket.get(Ticket.code == issued.code)
        KioskAudit.create(action="reissue", outcome="issued", code=issued.code, ticket=new.id, client=by[:64],
                          detail="replaces " + (", ".join(f"ticket {t.id}" for t in old) or "no working slip"))
    log.info("kiosk: ticket %d reissued by %s (revoked: %s)", new.id, by, ",".join(str(t.id) for t in old) or "none")
    return issued


def _revoked(ticket_id: int) -> bool:
    return KioskAudit.select().where(KioskAudit.ticket == ticket_id, KioskAudit.action == "reissue",
                                     KioskAudit.outcome == "revoked").exists()


# ---------------------------------------------------------------------- lookup


def throttle_wait_s(client: str, settings: GuardSettings, now: dt.datetime | None = None) -> float:
    """Seconds before the next try is taken; 0 when it may go on.

    Two budgets in ``throttle_window_s``: ``throttle_after_failures`` failed lookups from one
    address, and ``throttle_node_failures`` from all addresses together (so rotating
    addresses gains nothing). Past either, each further failure doubles the pause (1 s,
    2 s, 4 s … up to ``throttle_max_delay_s``). Tries still being checked count as failed.
    Read from the audit log, so a restart does not reset it.
    """
    now = now or utcnow()
    since = now - dt.timedelta(seconds=settings.throttle_window_s)
    failed = (
        (KioskAudit.action == "lookup")
        & (KioskAudit.outcome.in_(tuple(FAILED_LOOKUPS)))
        & (KioskAudit.at >= since)
    )
    return max(
        _pause(failed & (KioskAudit.client == client), settings.throttle_after_failures, settings, now),
        _pause(failed, settings.throttle_node_failures, settings, now),
    )


def _pause(where: Expression, budget: int, settings: GuardSettings, now: dt.datetime) -> float:
    failures, last = row(
        KioskAudit.select(fn.COUNT(KioskAudit.id), fn.MAX(KioskAudit.at)).where(where), tuple[int, dt.datetime | str | None]
    )
    excess = int(failures) - budget
    if excess < 0 or last is None:
        return 0.0
    last = last if isinstance(last, dt.datetime) else dt.datetime.fromisoformat(str(last))
    pause = min(settings.throttle_max_delay_s, 2.0**excess)
    return max(0.0, pause - (now - last).total_seconds())


@dataclass(frozen=True)
class _Claim:
    """A try taken under the rules and counted as failed until its PIN proves right."""

    audit_id: int
    ticket: Ticket | None
    failed: int  # wrong PINs on this code, this try included
    locks: bool  # this try, if wrong, is the one that locks the code


def look_up(code_text: str, pin: str, client: str, settings: GuardSettings, data_dir: Path) -> Lookup:
    """Check a code + PIN under the lockout and throttle rules, and audit the attempt.

    An unknown code and a real code with a wrong PIN take the same path, the same scrypt
    check and the same answer ("wrong_pin" with tries left, then "locked"): the kiosk is
    no oracle for which codes exist. The audit log (staff only) still tells them apart.
    """
    code = normalise_code(code_text) or ""
    claim = _claim_try(code, code_text, client, settings)
    if isinstance(claim, Lookup):
        return claim
    ticket = claim.ticket
    matched = secret_matches(pin, ticket.pin_hash if ticket is not None else DUMMY_HASH)
    if not matched or ticket is None:  # the dummy hash matches no PIN
        return _wrong_pin(claim, code, client, settings)
    now = utcnow()
    if ticket.expires_at <= now:  # a revoked slip reads the same to the patient: "ask at reception"
        why = "revoked" if _revoked(ticket.id) else "expired"
        _finish_lookup(claim, code, why)
        log.info("kiosk: lookup from %s: %s (ticket %d)", client, why, ticket.id)
        return Lookup("expired", ticket.id)
    study = _study_for(ticket.accession_number)
    ready = study is not None and current_report(
        study.study_instance_uid, data_dir, print_preliminary=settings.print_preliminary
    ) is not None
    outcome = "ready" if ready else "not_ready"
    _finish_lookup(claim, code, outcome)
    log.info("kiosk: lookup from %s: %s (ticket %d)", client, outcome, ticket.id)
    if ready:
        return Lookup("ready", ticket.id)
    wait, hours = _not_ready(study, settings, now, data_dir)
    return Lookup("not_ready", ticket.id, estimate_hours=hours, wait=wait)


def _claim_try(code: str, code_text: str, client: str, settings: GuardSettings) -> _Claim | Lookup:
    """Throttle, lock and count the try in one write transaction, before any PIN is checked.

    The transaction is IMMEDIATE (SQLite's write lock, across processes too), so of any
    number of tries at once exactly ``max_pin_failures`` reach the PIN check and the rest
    see the lock; the throttle sees every try still being checked as a failure.
    """
    with write_transaction():
        now = utcnow()
        wait = throttle_wait_s(client, settings, now)
        if wait > 0:
            _audit(code, client, "throttled", now)
            return Lookup("throttled", wait_s=wait)
        if not code:
            _audit(code_text[:16] if code_text.isdigit() else "", client, "bad_code", now)
            return Lookup("bad_code")
        PinGuard.delete().where(
            (PinGuard.last_try_at < now - dt.timedelta(days=PIN_FAILURES_KEPT_DAYS))
            & (PinGuard.locked_until.is_null() | (PinGuard.locked_until <= now))
        ).execute()
        guard = PinGuard.get_or_none(PinGuard.code == code)
        if guard is not None and guard.locked_until is not None and guard.locked_until > now:
            _audit(code, client, "locked", now)
            return Lookup("locked", wait_s=(guard.locked_until - now).total_seconds())
        (
            PinGuard.insert(code=code, failed_pins=1, last_try_at=now)
            .on_conflict(
                conflict_target=[PinGuard.code],
                update={PinGuard.failed_pins: PinGuard.failed_pins + 1, PinGuard.last_try_at: now,
                        PinGuard.locked_until: None},
            )
            .execute()
        )
        failed = PinGuard.get(PinGuard.code == code).failed_pins
        locks = failed >= settings.max_pin_failures
        if locks:  # locked now, so a try arriving while this one is checked is refused
            until = now + dt.timedelta(minutes=settings.lockout_minutes)
            PinGuard.update(failed_pins=0, locked_until=until).where(PinGuard.code == code).execute()
        ticket = Ticket.get_or_none(Ticket.code == code)
        row = KioskAudit.create(action="lookup", outcome="checking", code=code,
                                ticket=ticket.id if ticket is not None else None, client=client, at=now)
    return _Claim(int(row.id), ticket, failed, locks)


def _wrong_pin(claim: _Claim, code: str, client: str, settings: GuardSettings) -> Lookup:
    outcome = "wrong_pin" if claim.ticket is not None else "unknown_code"
    _finish_lookup(claim, code, outcome, "code locked" if claim.locks else "", forget_failures=False)
    which = f"ticket {claim.ticket.id}" if claim.ticket is not None else "no such slip"
    if claim.locks:
        log.warning("kiosk: lookup from %s: %s (%s), code locked for %g min", client, outcome, which,
                    settings.lockout_minutes)
        return Lookup("locked", wait_s=settings.lockout_minutes * 60)
    left = settings.max_pin_failures - claim.failed
    log.info("kiosk: lookup from %s: %s (%s, %d left)", client, outcome, which, left)
    return Lookup("wrong_pin", tries_left=left)


def _finish_lookup(claim: _Claim, code: str, outcome: str, detail: str = "", forget_failures: bool = True) -> None:
    """The try's final outcome on its audit row; a right PIN clears the code's wrong ones."""
    with write_transaction():
        KioskAudit.update(outcome=outcome, detail=detail).where(KioskAudit.id == claim.audit_id).execute()
        if forget_failures:
            PinGuard.delete().where(PinGuard.code == code).execute()


def _audit(code: str, client: str, outcome: str, now: dt.datetime) -> None:
    """One audit row for a try refused before its PIN was checked (inside the caller's transaction)."""
    KioskAudit.create(action="lookup", outcome=outcome, code=code, client=client, at=now)
    log.info("kiosk: lookup from %s: %s", client, outcome)


def _study_for(accession_number: str) -> Study | None:
    """The newest study with this accession, preferring one whose report is in."""
    return (
        Study.select()
        .where(Study.accession_number == accession_number)
        .order_by((Study.report_state == ReportState.NONE).asc(), Study.received_at.desc())
        .first()
    )


def _not_ready(study: Study | None, settings: GuardSettings, now: dt.datetime, data_dir: Path) -> tuple[NotReady, float]:
    """Where the report is and the hours until it is likely in, so the patient is told the truth.

    A reader's draft in: "writing" (later today). Every image in the cloud: "with_doctor"
    (later today) until ``report_estimate_hours`` since they got there, then "overdue"
    (ask at reception). Images still on their way (or not taken): the configured
    turnaround less the time already waited, in hours.
    """
    if study is None:
        return "uploading", settings.report_estimate_hours
    if preliminary_report(study.study_instance_uid, data_dir) is not None:
        return "writing", 1.0
    synced_at = _in_cloud_since(study.id)
    if synced_at is not None:
        waited = (now - synced_at).total_seconds() / 3600
        if waited > settings.report_estimate_hours:
            return "overdue", 0.0
        return "with_doctor", max(1.0, settings.report_estimate_hours - waited)
    waited = (now - study.received_at).total_seconds() / 3600
    return "uploading", max(1.0, settings.report_estimate_hours - waited)


def _in_cloud_since(study_id: int) -> dt.datetime | None:
    """When the study's last image reached the cloud; None while any is still to go (or it has none)."""
    states, last = row(
        Outbox.select(fn.COUNT(Outbox.id).filter(Outbox.state != SyncState.SYNCED), fn.MAX(Outbox.synced_at))
        .join(Instance).where(Instance.study == study_id),
        tuple[int, dt.datetime | str | None],
    )
    if int(states) or last is None:
        return None
    return last if isinstance(last, dt.datetime) else dt.datetime.fromisoformat(str(last))


def _patient_ids(accession_number: str, study: Study) -> tuple[tuple[str, str], ...]:
    """The page's second identifier: the visit's SA ID or folder number (else date of birth),
    else the DICOM Patient ID the study came with (a slip made without a visit)."""
    visit = (
        Visit.select(Visit.patient_id, Visit.id_kind, Visit.birth_date).join(Order)
        .where(Order.accession_number == accession_number).first()
    )
    if visit is not None:
        found: list[tuple[str, str]] = []
        if visit.patient_id.strip():
            found.append(("id_said" if visit.id_kind == "said" else "id_folder", visit.patient_id.strip()))
        if visit.birth_date.strip():
            found.append(("birth_date", visit.birth_date.strip()))
        if found:
            return tuple(found)
    return (("patient_id", study.patient_id.strip()),) if study.patient_id.strip() else ()


# ---------------------------------------------------------------------- the ready report


def ticket_report(ticket_id: int, data_dir: Path, settings: GuardSettings) -> TicketReport | None:
    """What the preview and the printed page show, or None when the report is not (or no longer) there."""
    ticket = Ticket.get_or_none(Ticket.id == ticket_id)
    if ticket is None:
        return None
    study = _study_for(ticket.accession_number)
    if study is None:
        return None
    report = current_report(study.study_instance_uid, data_dir, print_preliminary=settings.print_preliminary)
    if report is None:
        return None
    extra = _amended_extra(study.study_instance_uid, report)
    used = _prints_used(ticket.id)
    return TicketReport(
        ticket_id=ticket.id,
        code=ticket.code,
        patient_name=ticket.patient_name,
        exam=ticket.exam,
        study_uid=study.study_instance_uid,
        study_date=study.study_date,
        report=report,
        prints_left=max(0, settings.print_limit + ticket.extra_prints + int(extra) - used),
        accession_number=ticket.accession_number,
        patient_ids=_patient_ids(ticket.accession_number, study),
        replaces_report_of=amendment_of(report) if report.status == "amended" else None,
        amended_extra=extra,
    )


def _amended_extra(study_uid: str, report: ReportView) -> bool:
    """An amended report whose predecessor was printed may be printed once beyond the limit."""
    return report.status == "amended" and amended_after_printing(study_uid)


def _prints_used(ticket_id: int) -> int:
    """Prints of the slip, whichever of its study's reports they were: the limit is per slip."""
    return (
        KioskAudit.select()
        .where(
            (KioskAudit.ticket == ticket_id)
            & (KioskAudit.action == "print")
            & (KioskAudit.outcome.in_(COUNTED_PRINTS))
        )
        .count()
    )


def reserve_print(ticket_id: int, report_sop_uid: str, client: str, settings: GuardSettings,
                  amended_extra: bool = False) -> int | None:
    """Take one print from the allowance before printing (so two taps cannot print twice).

    ``amended_extra``: the report amends one already printed, so the slip may print once
    beyond its limit; the print that uses that extra gets its own audit row. Returns the
    audit row id to finish with :func:`finish_print`, or None at the limit.
    """
    with write_transaction():
        ticket = Ticket.get_by_id(ticket_id)
        limit = settings.print_limit + ticket.extra_prints
        used = _prints_used(ticket_id)
        if used >= limit + int(amended_extra):
            KioskAudit.create(action="print", outcome="limit_reached", code=ticket.code, ticket=ticket_id,
                              client=client, report_sop_uid=report_sop_uid)
            log.info("kiosk: print from %s refused: limit of %d reached (ticket %d)", client,
                     limit + int(amended_extra), ticket_id)
            return None
        if used >= limit:
            KioskAudit.create(action="print", outcome="amended_extra", code=ticket.code, ticket=ticket_id,
                              client=client, report_sop_uid=report_sop_uid,
                              detail=f"one print beyond the limit of {limit}: the printed report was amended")
            log.info("kiosk: ticket %d prints amended report %s beyond its limit of %d", ticket_id, report_sop_uid, limit)
        row = KioskAudit.create(action="print", outcome="printing", code=ticket.code, ticket=ticket_id,
                                client=client, report_sop_uid=report_sop_uid)
    return int(row.id)


def finish_print(audit_id: int, outcome: str, job: str = "", detail: str = "", study_uid: str = "") -> None:
    """Record how a reserved print ended; a printed report's study becomes ``printed``."""
    with write_transaction():
        KioskAudit.update(outcome=outcome, job=job[:64], detail=detail[:500]).where(KioskAudit.id == audit_id).execute()
        if outcome == "printed" and study_uid:
            Study.update(report_state=ReportState.PRINTED, updated_at=utcnow()).where(
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
        Ticket.update(extra_prints=extra).where(Ticket.id == ticket.id).execute()
        PinGuard.delete().where(PinGuard.code == code).execute()
        KioskAudit.create(action="reprint_allowed", outcome="allowed", code=code, ticket=ticket.id, client=by[:64],
                          detail=f"+{count}")
    log.info("kiosk: %d more print(s) allowed for ticket %d by %s", count, ticket.id, by)
    return extra
