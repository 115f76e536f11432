"""What the console shows: the day's visits with where each one's images are, and unmatched studies.

A fixed handful of grouped queries however many visits there are (500 a day in the
benchmark), so a refresh stays cheap for the node that is also receiving images.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from peewee import Case, fn

from edge.orders.tables import Order, StudyMatch, Visit
from edge.store.const import ReportState, SyncState
from edge.store.models import Instance, Outbox, Series, Study, utcnow
from edge.store.rows import rows


@dataclass
class _Progress:
    states: set[SyncState] = field(default_factory=set)
    total_bytes: int = 0
    synced_bytes: int = 0
    in_flight_bytes: int = 0  # of instances being sent: how much has left the node (sync.outbox.record_progress)
    instances: int = 0
    sent: int = 0  # instances in the cloud, or whose every byte has left in the request under way
    queued: int = 0  # pending or failed: waiting for a slot
    sending: int = 0
    reason: str = ""
    report: ReportState = ReportState.NONE


@dataclass(frozen=True)
class VisitRow:
    order_id: int
    accession_number: str
    patient_name: str  # for the screen only
    patient_id: str
    exam: str
    modality: str
    registered: str  # node-local HH:MM
    stat: bool
    ticket_code: str
    state: str  # waiting | received | uploading | in_cloud | report_ready | printed
    percent: int  # of the images' bytes: in the cloud, plus what has left the node in the request under way
    problem: str  # "" | failed | quarantined
    reason: str
    instances: int
    study_uids: tuple[str, ...]
    sent: int = 0  # images in the cloud or wholly sent ("3 of 5 images")
    queued: int = 0  # images waiting for an upload slot (pending or failed)
    sending: int = 0  # images in a request under way
    registered_at: dt.datetime | None = None  # UTC, when the order was made

    @property
    def signature(self) -> str:
        """Changes whenever what the row shows changes: the page refetches only such rows."""
        return (f"{self.state}|{self.percent}|{self.problem}|{int(self.stat)}|{self.instances}|{self.sent}|"
                f"{int(bool(self.queued))}{int(bool(self.sending))}|{int(bool(self.ticket_code))}|{self.reason[:40]}")


def display_name(pn: str) -> str:
    family, _, given = pn.partition("^")
    return f"{family.upper()}, {given.replace('^', ' ')}" if given else family.upper()


def _study_progress(study_ids: list[int]) -> dict[int, _Progress]:
    progress: dict[int, _Progress] = {sid: _Progress() for sid in study_ids}
    if not study_ids:
        return progress
    # While sending, uploaded_bytes is how much of the instance has left, in its spool bytes (never over its size).
    gone = fn.MIN(Outbox.uploaded_bytes, Instance.size)
    query = (
        Outbox.select(Instance.study, Outbox.state, fn.COUNT(Outbox.id), fn.COALESCE(fn.SUM(Instance.size), 0),
                      fn.MAX(Outbox.last_error), fn.COALESCE(fn.SUM(gone), 0),
                      fn.COALESCE(fn.SUM(Case(None, [(Outbox.uploaded_bytes >= Instance.size, 1)], 0)), 0))
        .join(Instance)
        .where(Instance.study.in_(study_ids))
        .group_by(Instance.study, Outbox.state)
    )
    for study_id, state, count, size, error, left, whole in rows(
            query, tuple[int, str, int, int, str | None, int, int]):
        p = progress[study_id]
        p.states.add(SyncState(state))
        p.instances += int(count)
        p.total_bytes += int(size)
        if state == SyncState.SYNCED:
            p.synced_bytes += int(size)
            p.sent += int(count)
        elif state == SyncState.SENDING:
            p.in_flight_bytes += int(left)
            p.sent += int(whole)
            p.sending += int(count)
        elif state in (SyncState.PENDING, SyncState.FAILED):
            p.queued += int(count)
        if state in (SyncState.QUARANTINED, SyncState.FAILED) and error and (state == SyncState.QUARANTINED or not p.reason):
            p.reason = str(error)
    reports = Study.select(Study.id, Study.report_state).where(Study.id.in_(study_ids))
    for study_id, report in rows(reports, tuple[int, str]):
        progress[study_id].report = ReportState(report)
    return progress


def _state(parts: list[_Progress]) -> tuple[str, int, str, str, int]:
    """(state, percent, problem, reason, instances) of an order from its studies.

    The percent counts bytes, not images: a 5-image study sent in one request moves while
    the request runs (the worker records what has left, ``sync.outbox.record_progress``).
    """
    if not parts or not any(p.instances for p in parts):
        return "waiting", 0, "", "", 0
    states = set().union(*(p.states for p in parts))
    total = sum(p.total_bytes for p in parts)
    synced = sum(p.synced_bytes + p.in_flight_bytes for p in parts)
    instances = sum(p.instances for p in parts)
    percent = int(100 * synced / total) if total else (100 if states == {SyncState.SYNCED} else 0)
    problem = next((s for s in (SyncState.QUARANTINED, SyncState.FAILED) if s in states), "")
    reason = next((p.reason for p in parts if p.reason), "")
    reports = {p.report for p in parts}
    if ReportState.PRINTED in reports:
        state = "printed"
    elif ReportState.READY in reports:
        state = "report_ready"
    elif states == {SyncState.SYNCED}:
        state = "in_cloud"
    elif states & {SyncState.SYNCED, SyncState.SENDING}:
        state = "uploading"
    else:
        state = "received"
    return state, percent, problem, reason, instances


def visits_for_day(day: dt.date | None = None) -> list[VisitRow]:
    """The day's orders, newest first, each with its live state."""
    key = (day or dt.date.today()).strftime("%Y%m%d")
    orders = list(rows(
        Order.select(Order.id, Order.accession_number, Visit.patient_name, Visit.patient_id, Order.exam,
                     Order.modality, Order.scheduled_time, Order.stat, Order.ticket_code, Order.created_at)
        .join(Visit)
        .where(Order.scheduled_date == key, Order.state != "cancelled")
        .order_by(Order.id.desc()),
        tuple[int, str, str, str, str, str, str, bool, str, dt.datetime | str],
    ))
    ids = [o[0] for o in orders]
    studies: dict[int, list[tuple[int, str]]] = {}
    if ids:
        matched = StudyMatch.select(StudyMatch.order, Study.id, Study.study_instance_uid).join(Study)
        for order_id, study_id, uid in rows(matched.where(StudyMatch.order.in_(ids)), tuple[int, int, str]):
            studies.setdefault(order_id, []).append((study_id, uid))
    progress = _study_progress([sid for pairs in studies.values() for sid, _ in pairs])
    visits = []
    for oid, accession, name, pid, exam, modality, time, stat, code, created in orders:
        pairs = studies.get(oid, [])
        parts = [progress[sid] for sid, _ in pairs]
        state, percent, problem, reason, instances = _state(parts)
        visits.append(VisitRow(
            order_id=oid, accession_number=accession, patient_name=display_name(name), patient_id=pid,
            exam=exam, modality=modality, registered=f"{time[:2]}:{time[2:4]}" if time else "",
            stat=bool(stat), ticket_code=code, state=state, percent=percent, problem=problem,
            reason=reason, instances=instances, study_uids=tuple(uid for _, uid in pairs),
            sent=sum(p.sent for p in parts), queued=sum(p.queued for p in parts),
            sending=sum(p.sending for p in parts),
            registered_at=created if isinstance(created, dt.datetime) else dt.datetime.fromisoformat(str(created)),
        ))
    return visits


@dataclass(frozen=True)
class UnmatchedStudy:
    study_instance_uid: str
    accession_number: str
    patient_id: str
    study_date: str
    modalities: str
    instances: int
    received_at: dt.datetime


def unmatched_studies(days: int = 7) -> list[UnmatchedStudy]:
    """Studies matching found no order for (an ECG without arming, a DR typed by hand)."""
    since = utcnow() - dt.timedelta(days=days)
    studies = list(rows(
        Study.select(Study.id, Study.study_instance_uid, Study.accession_number, Study.patient_id,
                     Study.study_date, Study.received_at)
        .join(StudyMatch, on=(StudyMatch.study == Study.id))
        .where(StudyMatch.order.is_null(True), Study.received_at >= since)
        .order_by(Study.received_at.desc()),
        tuple[int, str, str, str, str, dt.datetime],
    ))
    ids = [r[0] for r in studies]
    mods: dict[int, set[str]] = {}
    counts: dict[int, int] = {}
    if ids:
        series = Series.select(Series.study, Series.modality).where(Series.study.in_(ids))
        for sid, modality in rows(series, tuple[int, str]):
            mods.setdefault(sid, set()).add(modality)
        counts = dict(rows(Instance.select(Instance.study, fn.COUNT(Instance.id)).where(Instance.study.in_(ids))
                           .group_by(Instance.study), tuple[int, int]))
    return [
        UnmatchedStudy(uid, acc, pid, sdate, ",".join(sorted(m for m in mods.get(sid, set()) if m)) or "?",
                       int(counts.get(sid, 0)), received)
        for sid, uid, acc, pid, sdate, received in studies
    ]
