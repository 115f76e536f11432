"""What a technician's buttons do to the queue, the kiosk and the ECG boxes; each one audited.

The outbox belongs to sync: the console only reorders it (STAT), makes rows due now
(send now) or hands quarantined rows back through ``sync.outbox.retry_quarantined``.
"""

from __future__ import annotations

import logging

from edge.orders.tables import Order, StudyMatch, Visit, audit
from edge.store.const import PRIORITY_STAT
from edge.store.db import write_transaction
from edge.store.models import Instance, Outbox, Study, utcnow
from firmware_bridge.boxes import arm_box
from kiosk.tickets import allow_reprint
from sync.outbox import retry_quarantined

log = logging.getLogger(__name__)

QUEUED = ("pending", "failed")


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


def _queued_rows(order_id: int) -> object:
    """Outbox ids of the order's instances still waiting to go (a sub-select)."""
    return (
        Outbox.select(Outbox.id).join(Instance).join(StudyMatch, on=(StudyMatch.study == Instance.study))
        .where(StudyMatch.order == order_id, Outbox.state.in_(QUEUED))
    )


def mark_stat(order_id: int, by: str, client: str = "") -> int:
    """The order's images jump the upload queue (now and as more arrive); returns rows moved."""
    with write_transaction():
        order = _order(order_id)
        Order.update(stat=True).where(Order.id == order_id).execute()
        moved = Outbox.update(priority=PRIORITY_STAT, next_attempt_at=utcnow()).where(
            Outbox.id.in_(_queued_rows(order_id))).execute()
        audit(by, "mark_stat", order, f"{moved} instance(s) moved to the front", client)
    log.info("console: order %d marked STAT by %s (%d instance(s) moved up)", order_id, by, moved)
    return int(moved)


def raise_stat_arrivals() -> int:
    """Images of a STAT order that arrived after it was marked go to the front too (run with matching)."""
    rows = [
        oid for (oid,) in Outbox.select(Outbox.id).join(Instance).join(StudyMatch, on=(StudyMatch.study == Instance.study))
        .join(Order).where(Order.stat == True, Outbox.state.in_(QUEUED), Outbox.priority > PRIORITY_STAT)  # noqa: E712
        .tuples()
    ]
    if rows:
        with write_transaction():
            Outbox.update(priority=PRIORITY_STAT).where(Outbox.id.in_(rows)).execute()
    return len(rows)


def send_now(order_id: int, by: str, client: str = "") -> int:
    """Waiting or failed rows become due now (the worker is woken by the caller)."""
    with write_transaction():
        order = _order(order_id)
        due = Outbox.update(next_attempt_at=utcnow()).where(Outbox.id.in_(_queued_rows(order_id))).execute()
        audit(by, "send_now", order, f"{due} instance(s) due now", client)
    log.info("console: order %d sent now by %s (%d instance(s))", order_id, by, due)
    return int(due)


def retry(order_id: int, by: str, client: str = "") -> int:
    """Quarantined instances of the order's studies are queued again (the cause has been fixed)."""
    uids = [uid for (uid,) in Study.select(Study.study_instance_uid).join(StudyMatch, on=(StudyMatch.study == Study.id))
            .where(StudyMatch.order == order_id).tuples()]
    if not uids:  # never call retry_quarantined with nothing: that means "all"
        return 0
    count = retry_quarantined(tuple(uids))
    with write_transaction():
        audit(by, "retry", _order(order_id), f"{count} quarantined instance(s) queued again", client)
    log.info("console: order %d: %d quarantined instance(s) retried by %s", order_id, count, by)
    return count


def reprint(order_id: int, by: str, client: str = "") -> None:
    order = _order(order_id)
    if not order.ticket_code:
        raise ActionError("This visit has no kiosk slip.", "no_slip")
    allow_reprint(order.ticket_code, by=by)
    with write_transaction():
        audit(by, "allow_reprint", order, "one more print at the kiosk", client)


def arm(box_id: str, order_id: int, by: str, client: str = "") -> None:
    """The box's next recording belongs to this visit's ECG order."""
    order = _order(order_id)
    visit = Visit.get_by_id(order.visit_id)
    arm_box(box_id, visit.patient_id, visit.patient_name, order.accession_number)
    with write_transaction():
        audit(by, "arm_box", order, f"box {box_id}", client)
    log.info("console: box %s armed for order %d by %s", box_id, order_id, by)
