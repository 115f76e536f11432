"""What a technician's buttons do to the queue, the report check, the kiosk and the ECG boxes; each one audited.

The outbox belongs to sync: STAT, send now and retry call ``sync.outbox`` with the
order's studies; the console writes only its own tables (the order, the audit).
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge.orders.register import set_ticket
from edge.orders.tables import Order, StudyMatch, audit
from edge.store.db import write_transaction
from edge.store.models import Study
from edge.store.rows import rows
from firmware_bridge.boxes import arm_box
from kiosk.tickets import IssuedTicket, allow_reprint, reissue_ticket
from sync import outbox
from sync.reports import check_now

log = logging.getLogger(__name__)


class ActionError(LookupError):
    """What went wrong, for the log; the console shows its ``code``'s fixed text (edge.console.pages.ERRORS)."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


def _order(order_id: int) -> Order:
    order = Order.get_or_none(Order.id == order_id)
    if order is None:
        raise ActionError("That visit no longer exists.", "no_visit")
    return order


def _study_uids(order_id: int) -> list[str]:
    """The studies matched or assigned to the order."""
    matched = Study.select(Study.study_instance_uid).join(StudyMatch, on=(StudyMatch.study == Study.id))
    return [uid for (uid,) in rows(matched.where(StudyMatch.order == order_id), tuple[str])]


def mark_stat(order_id: int, by: str, client: str = "") -> int:
    """The order's images jump the upload queue (now and as more arrive); returns rows moved.

    The order is marked first: should the node stop before its rows move, the sync
    service's next look at arrivals (``sync.outbox.raise_stat_arrivals``) moves them.
    """
    with write_transaction():
        order = _order(order_id)
        Order.update(stat=True).where(Order.id == order_id).execute()
    moved = outbox.raise_priority(_study_uids(order_id))
    with write_transaction():
        audit(by, "mark_stat", order, f"{moved} instance(s) moved to the front", client)
    log.info("console: order %d marked STAT by %s (%d instance(s) moved up)", order_id, by, moved)
    return moved


def send_now(order_id: int, by: str, client: str = "") -> int:
    """Waiting or failed rows become due now (the worker is woken by the caller)."""
    order = _order(order_id)
    due = outbox.send_now(_study_uids(order_id))
    with write_transaction():
        audit(by, "send_now", order, f"{due} instance(s) due now", client)
    log.info("console: order %d sent now by %s (%d instance(s))", order_id, by, due)
    return due


def retry(order_id: int, by: str, client: str = "") -> int:
    """Quarantined instances of the order's studies are queued again (the cause has been fixed)."""
    uids = _study_uids(order_id)
    if not uids:  # never call retry_quarantined with nothing: that means "all"
        return 0
    count = outbox.retry_quarantined(tuple(uids))
    with write_transaction():
        audit(by, "retry", _order(order_id), f"{count} quarantined instance(s) queued again", client)
    log.info("console: order %d: %d quarantined instance(s) retried by %s", order_id, count, by)
    return count


def check_report(order_id: int, by: str, data_dir: Path, client: str = "") -> int:
    """Staff's "Check for the report now": the order's studies go into the puller's next poll, which starts now."""
    order = _order(order_id)
    asked = sum(check_now(uid, data_dir) for uid in _study_uids(order_id))
    if not asked:
        raise ActionError(f"order {order_id} has no study on this node", "no_study")
    with write_transaction():
        audit(by, "check_report_now", order, f"{asked} study(ies): the cloud is asked for the report now", client)
    log.info("console: order %d: report check requested by %s (%d study(ies))", order_id, by, asked)
    return asked


def reprint(order_id: int, by: str, client: str = "") -> None:
    order = _order(order_id)
    if not order.ticket_code:
        raise ActionError("This visit has no kiosk slip.", "no_slip")
    allow_reprint(order.ticket_code, by=by)
    with write_transaction():
        audit(by, "allow_reprint", order, "one more print at the kiosk", client)


def reissue_slip(order_id: int, by: str, *, pin_digits: int, valid_days: int, client: str = "") -> IssuedTicket:
    """A patient lost the slip: a new code + PIN for the same visit (the same order and accession); the old slip stops now."""
    order = _order(order_id)
    visit = order.visit
    old_code = order.ticket_code
    ticket = reissue_ticket(order.accession_number, visit.patient_name.replace("^", " "), order.exam, by=by,
                            pin_digits=pin_digits, valid_days=valid_days)
    set_ticket(order_id, ticket.code)
    with write_transaction():
        audit(by, "reissue_slip", order, "new slip code and PIN; the old slip no longer works" if old_code
              else "new slip code and PIN (the visit had none)", client)
    log.info("console: order %d: slip reissued by %s", order_id, by)
    return ticket


def arm(box_id: str, order_id: int, by: str, client: str = "") -> None:
    """The box's next recording belongs to this visit's ECG order."""
    order = _order(order_id)
    visit = order.visit  # one query, as get_by_id was
    arm_box(box_id, visit.patient_id, visit.patient_name, order.accession_number)
    with write_transaction():
        audit(by, "arm_box", order, f"box {box_id}", client)
    log.info("console: box %s armed for order %d by %s", box_id, order_id, by)
