"""Which order a received study belongs to: decided after ingest, never during C-STORE.

The C-STORE path stays as lean as the ingest work made it; the sync service runs
:func:`match_new_studies` after each burst of arrivals and every poll (``sync.arrivals``:
a few indexed queries, a write only when there is something new), so a study is matched
moments after it is kept, whether or not anyone has the console open. The order of
evidence: our own Study Instance UID from the worklist, then the accession number, then
the patient id with the study date (only when exactly one order of that kind fits).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from peewee import JOIN

from edge.orders.const import ECG_MODALITY
from edge.orders.tables import Order, StudyMatch, Visit, audit
from edge.store.db import write_transaction
from edge.store.models import Series, Study, utcnow
from edge.store.rows import rows

log = logging.getLogger(__name__)

# Unmatched studies younger than this are looked at again on each pass: the order may be
# registered after the images (an emergency scanned first).
RETRY_UNMATCHED_DAYS = 2


@dataclass(frozen=True)
class _Candidate:
    study_id: int
    study_uid: str
    accession: str
    patient_id: str
    study_date: str
    received_at: dt.datetime
    is_ecg: bool
    previous: int | None  # StudyMatch id when it was looked at before (unmatched)


def _local_date(utc: dt.datetime) -> str:
    return utc.replace(tzinfo=dt.UTC).astimezone().strftime("%Y%m%d")


def _candidates() -> list[_Candidate]:
    since = utcnow() - dt.timedelta(days=RETRY_UNMATCHED_DAYS)
    query = (
        Study.select(Study.id, Study.study_instance_uid, Study.accession_number, Study.patient_id,
                     Study.study_date, Study.received_at, StudyMatch.id)
        .join(StudyMatch, join_type=JOIN.LEFT_OUTER, on=(StudyMatch.study == Study.id))
        .where(StudyMatch.id.is_null(True) | (StudyMatch.order.is_null(True) & (StudyMatch.how == "none")
                                                & (Study.received_at >= since)))
    )
    found = list(rows(query, tuple[int, str, str, str, str, dt.datetime, int | None]))
    if not found:
        return []
    ecg = {sid for (sid,) in rows(Series.select(Series.study).where(
        Series.study.in_([r[0] for r in found]), Series.modality == ECG_MODALITY), tuple[int])}
    return [_Candidate(r[0], r[1], r[2], r[3], r[4], r[5], r[0] in ecg, r[6]) for r in found]


def _find_order(c: _Candidate) -> tuple[int | None, str]:
    order_id = Order.select(Order.id).where(Order.study_instance_uid == c.study_uid).scalar()
    if order_id:
        return int(order_id), "study_uid"
    if c.accession:
        order_id = Order.select(Order.id).where(Order.accession_number == c.accession).scalar()
        if order_id:
            return int(order_id), "accession"
    if c.patient_id:
        day = c.study_date or _local_date(c.received_at)
        kind = (Order.modality == ECG_MODALITY) if c.is_ecg else (Order.modality != ECG_MODALITY)
        ids = [oid for (oid,) in rows(Order.select(Order.id).join(Visit).where(
            Visit.patient_id == c.patient_id, Order.scheduled_date == day, Order.state != "cancelled", kind,
        ), tuple[int])]
        if len(ids) > 1:  # prefer the one order still waiting for images
            matched = StudyMatch.select(StudyMatch.order).where(StudyMatch.order.in_(ids))
            taken = {oid for (oid,) in rows(matched, tuple[int])}
            ids = [oid for oid in ids if oid not in taken]
        if len(ids) == 1:
            return ids[0], "patient_date"
    return None, "none"


def match_new_studies() -> int:
    """Match studies not yet looked at (and recent unmatched ones); returns how many got an order."""
    candidates = _candidates()
    if not candidates:
        return 0
    decided = [(c, *_find_order(c)) for c in candidates]
    changes = [(c, oid, how) for c, oid, how in decided if oid is not None or c.previous is None]
    if not changes:
        return 0
    matched = 0
    with write_transaction():
        for c, order_id, how in changes:
            if c.previous is None:
                StudyMatch.insert(study=c.study_id, order=order_id, how=how).on_conflict_ignore().execute()
            else:
                StudyMatch.update(order=order_id, how=how, matched_at=utcnow()).where(
                    StudyMatch.id == c.previous, StudyMatch.order.is_null(True)).execute()
            if order_id is not None:
                Order.update(state="started").where(Order.id == order_id, Order.state == "scheduled").execute()
                matched += 1
    for c, order_id, how in changes:
        if order_id is None:
            log.info("orders: study %s is unmatched (no order with its UID, accession or patient/date)", c.study_uid)
        else:
            log.info("orders: study %s matched to order %d by %s", c.study_uid, order_id, how)
    return matched


class AssignError(LookupError):
    """The message is shown to the technician."""


def assign_study(study_uid: str, order_id: int, by: str, client: str = "") -> None:
    """A technician says this study (or ECG) belongs to that order."""
    with write_transaction():
        study = Study.get_or_none(Study.study_instance_uid == study_uid)
        order = Order.get_or_none(Order.id == order_id)
        if study is None:
            raise AssignError("That study is no longer on this node.")
        if order is None:
            raise AssignError("That order does not exist.")
        values = {"order": order.id, "how": "assigned", "matched_at": utcnow(), "matched_by": by[:64]}
        if StudyMatch.update(**values).where(StudyMatch.study == study.id).execute() == 0:
            StudyMatch.create(study=study.id, **values)
        Order.update(state="started").where(Order.id == order.id, Order.state == "scheduled").execute()
        audit(by, "assign", order, f"study {study_uid}", client)
    log.info("orders: study %s assigned to order %d by %s", study_uid, order_id, by)
