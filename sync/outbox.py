"""The outbox state machine in the store: claim a batch, then mark it synced, failed or quarantined.

The one writer of the outbox: every change of a row's state, priority or due time is a
function here (the console's STAT, send now and retry call them); the row itself is born
with its instance in ``edge.store.spool.queue_upload``. Other packages read through the
typed queries at the end of this module or ``edge.store.queries``, never the model.

Every transition is one short write transaction, so the worker holds nothing in memory
that a power cut could lose: a row left ``sending`` at a crash goes back to ``pending``
(flagged ``uncertain``, so the cloud is asked before it is sent again).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from peewee import fn

from edge.orders.tables import Order, StudyMatch
from edge.store.const import PRIORITY_ROUTINE, PRIORITY_STAT, SyncState
from edge.store.db import write_transaction
from edge.store.models import Instance, Outbox, Study, log_event, utcnow
from edge.store.queries import study_sync_state
from edge.store.rows import rows

log = logging.getLogger(__name__)

# Waiting for a slot: new, or failed and due again. Quarantined rows wait for a human.
RETRYABLE_STATES: tuple[SyncState, ...] = (SyncState.PENDING, SyncState.FAILED)


@dataclass(frozen=True)
class BatchItem:
    outbox_id: int
    sop_instance_uid: str
    path: str  # relative to the spool
    size: int
    priority: int
    attempts: int
    uncertain: bool


@dataclass(frozen=True)
class Batch:
    """Instances of one study sent in one STOW-RS request."""

    study_instance_uid: str
    items: tuple[BatchItem, ...]

    @property
    def size(self) -> int:
        return sum(item.size for item in self.items)


def release_interrupted() -> int:
    """At start-up: what was being sent when the process died goes back in the queue.

    The body may have reached the cloud before the crash, so the rows are marked
    uncertain and the worker asks the cloud (QIDO-RS) before sending them again.
    """
    with write_transaction():
        count = (
            Outbox.update(state=SyncState.PENDING, uncertain=True, updated_at=utcnow())
            .where(Outbox.state == SyncState.SENDING)
            .execute()
        )
    if count:
        log.warning("outbox: %d instance(s) were being sent when the node stopped: queued again", count)
    return int(count)


def _due(now: dt.datetime, routine_allowed: bool) -> list[object]:
    conditions: list[object] = [
        Outbox.state.in_(RETRYABLE_STATES),
        Outbox.next_attempt_at <= now,
        Instance.evicted_at.is_null(True),
        Instance.file_missing == False,  # noqa: E712
    ]
    if not routine_allowed:
        conditions.append(Outbox.priority < PRIORITY_ROUTINE)
    return conditions


def claim_batch(
    routine_allowed: bool, max_bytes: int, max_instances: int, now: dt.datetime | None = None
) -> Batch | None:
    """Take the most urgent due instance and more of its study, up to the caps; mark them sending.

    Priority first (STAT, ECG, routine), then oldest. The first instance is always taken,
    even when it alone is over ``max_bytes``.
    """
    now = now or utcnow()
    with write_transaction():
        order = (Outbox.priority, Outbox.created_at, Outbox.id)
        first = (
            Outbox.select(Outbox.id, Instance.study)
            .join(Instance)
            .where(*_due(now, routine_allowed))
            .order_by(*order)
            .limit(1)
            .tuples()
            .first()
        )
        if first is None:
            return None
        study_id = first[1]
        candidates = (
            Outbox.select(
                Outbox.id, Instance.sop_instance_uid, Instance.path, Instance.size,
                Outbox.priority, Outbox.attempts, Outbox.uncertain,
            )
            .join(Instance)
            .where(*_due(now, routine_allowed), Instance.study == study_id)
            .order_by(*order)
            .limit(max_instances)
        )
        items: list[BatchItem] = []
        total = 0
        for row in rows(candidates, tuple[int, str, str, int, int, int, bool]):
            item = BatchItem(*row)
            if items and total + item.size > max_bytes:
                break
            items.append(item)
            total += item.size
        Outbox.update(state=SyncState.SENDING, updated_at=now, uploaded_bytes=0).where(
            Outbox.id.in_([i.outbox_id for i in items])).execute()
        study_uid = Study.get_by_id(study_id).study_instance_uid
    return Batch(study_uid, tuple(items))


def record_progress(gone: dict[int, int]) -> None:
    """How much of each instance in a request under way has left the node, for the console's byte progress.

    ``gone``: outbox id → bytes sent so far, counted in the instance's spool bytes (the
    worker scales a compressed body back), so the console weighs every image by its size.
    Only rows still ``sending`` change: a late write after the outcome touches nothing.
    """
    if not gone:
        return
    with write_transaction():
        for outbox_id, nbytes in gone.items():
            Outbox.update(uploaded_bytes=nbytes).where(
                Outbox.id == outbox_id, Outbox.state == SyncState.SENDING).execute()


def mark_synced(study_uid: str, uploaded: dict[int, int]) -> None:
    """``uploaded``: outbox id → bytes sent for it (0 when the cloud already had it)."""
    if not uploaded:
        return
    now = utcnow()
    with write_transaction():
        for outbox_id, nbytes in uploaded.items():
            Outbox.update(
                state=SyncState.SYNCED, synced_at=now, updated_at=now, uploaded_bytes=nbytes,
                uncertain=False, last_error="",
            ).where(Outbox.id == outbox_id).execute()
        log_event("synced", f"{len(uploaded)} instance(s)", study_uid)


def mark_failed(
    study_uid: str, ids: Iterable[int], reason: str, retry_in_s: float = 0.0, uncertain: bool = False
) -> None:
    """A transient failure: the rows stay in the queue, visibly ``failed``, retried after ``retry_in_s``."""
    ids = list(ids)
    if not ids:
        return
    now = utcnow()
    with write_transaction():
        update: dict[object, object] = {
            Outbox.state: SyncState.FAILED,
            Outbox.attempts: Outbox.attempts + 1,
            Outbox.last_error: reason[:500],
            Outbox.next_attempt_at: now + dt.timedelta(seconds=retry_in_s),
            Outbox.updated_at: now,
        }
        if uncertain:
            update[Outbox.uncertain] = True
        Outbox.update(update).where(Outbox.id.in_(ids)).execute()
        log_event("upload_failed", reason[:500], study_uid)


def fail_unfinished(batch: Batch, reason: str, retry_in_s: float = 0.0, uncertain: bool = False) -> None:
    """Rows of a batch still ``sending`` when its upload ended early go back in the queue."""
    ids = [item.outbox_id for item in batch.items]
    # Only this batch's slot changes its rows, so reading then writing is not a race.
    left = [row.id for row in Outbox.select(Outbox.id).where(Outbox.id.in_(ids), Outbox.state == SyncState.SENDING)]
    mark_failed(batch.study_instance_uid, left, reason, retry_in_s, uncertain)


def mark_quarantined(study_uid: str, failures: dict[int, str], sop_uids: dict[int, str]) -> None:
    """The cloud will never take these as they are: stop retrying and show a human why."""
    if not failures:
        return
    now = utcnow()
    with write_transaction():
        for outbox_id, reason in failures.items():
            Outbox.update(state=SyncState.QUARANTINED, last_error=reason[:500], updated_at=now, uncertain=False).where(
                Outbox.id == outbox_id
            ).execute()
            log_event("quarantined", reason[:500], study_uid, sop_uids.get(outbox_id, ""))
    for outbox_id, reason in failures.items():
        log.error("outbox: instance %s of study %s quarantined: %s", sop_uids.get(outbox_id, "?"), study_uid, reason)


def clear_uncertain(ids: Sequence[int]) -> None:
    """The cloud was asked and does not have these: a plain resend is safe."""
    if ids:
        with write_transaction():
            Outbox.update(uncertain=False).where(Outbox.id.in_(list(ids))).execute()


def retry_quarantined(study_uids: Sequence[str] = ()) -> int:
    """``edge retry``: send quarantined instances again (of these studies, or all)."""
    now = utcnow()
    with write_transaction():
        query = Outbox.select(Outbox.id).join(Instance).join(Study).where(Outbox.state == SyncState.QUARANTINED)
        if study_uids:
            query = query.where(Study.study_instance_uid.in_(list(study_uids)))
        ids = [row.id for row in query]
        if ids:
            Outbox.update(state=SyncState.PENDING, attempts=0, next_attempt_at=now, updated_at=now, last_error="").where(
                Outbox.id.in_(ids)
            ).execute()
            log_event("retry", f"{len(ids)} quarantined instance(s) queued again by an operator")
    return len(ids)


def next_attempt_at(routine_allowed: bool) -> dt.datetime | None:
    """When the earliest parked instance becomes due (for the worker's sleep)."""
    conditions = [Outbox.state.in_(RETRYABLE_STATES), Instance.evicted_at.is_null(True)]
    if not routine_allowed:
        conditions.append(Outbox.priority < PRIORITY_ROUTINE)
    value = Outbox.select(Outbox.next_attempt_at).join(Instance).where(*conditions).order_by(
        Outbox.next_attempt_at
    ).limit(1).scalar()
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))


def _queued_of(study_uids: Sequence[str]) -> object:
    """Outbox ids of these studies' instances still waiting to go (a sub-select)."""
    return (
        Outbox.select(Outbox.id).join(Instance).join(Study)
        .where(Study.study_instance_uid.in_(list(study_uids)), Outbox.state.in_(RETRYABLE_STATES))
    )


def raise_priority(study_uids: Sequence[str]) -> int:
    """STAT: these studies' waiting instances go to the front of the queue and are due now; returns rows moved."""
    if not study_uids:
        return 0
    with write_transaction():
        moved = Outbox.update(priority=PRIORITY_STAT, next_attempt_at=utcnow()).where(
            Outbox.id.in_(_queued_of(study_uids))).execute()
    return int(moved)


def send_now(study_uids: Sequence[str]) -> int:
    """Waiting or failed instances of these studies become due now (the caller wakes the worker)."""
    if not study_uids:
        return 0
    with write_transaction():
        due = Outbox.update(next_attempt_at=utcnow()).where(
            Outbox.id.in_(_queued_of(study_uids))).execute()
    return int(due)


def raise_stat_arrivals() -> int:
    """Images of a STAT order that arrived after it was marked go to the front too; returns rows raised.

    Run by the sync service each time something is kept (``sync.arrivals``), after matching,
    so a late image of a STAT visit is raised before a slot looks for its next batch.
    """
    late = (
        Outbox.select(Outbox.id).join(Instance)
        .join(StudyMatch, on=(StudyMatch.study == Instance.study)).join(Order)
        .where(Order.stat == True, Outbox.state.in_(RETRYABLE_STATES), Outbox.priority > PRIORITY_STAT)  # noqa: E712
    )
    raised = [oid for (oid,) in rows(late, tuple[int])]
    if raised:
        with write_transaction():
            Outbox.update(priority=PRIORITY_STAT).where(
                Outbox.id.in_(raised), Outbox.state.in_(RETRYABLE_STATES)).execute()
    return len(raised)


# ---------------------------------------------------------------------- typed reads


def state_of_study(study_uid: str) -> SyncState | None:
    """The study's sync state (its worst instance's, as ``edge studies`` shows it); None when not on this node."""
    of_study = Outbox.select(Outbox.state).join(Instance).join(Study).where(Study.study_instance_uid == study_uid)
    states = {SyncState(state) for (state,) in rows(of_study.distinct(), tuple[str])}
    return study_sync_state(states) if states else None


def counts_by_state() -> dict[SyncState, int]:
    """Outbox rows in each state, every state present (0 when none)."""
    counts = {state: 0 for state in SyncState}
    for state, count in rows(Outbox.select(Outbox.state, fn.COUNT(Outbox.id)).group_by(Outbox.state), tuple[str, int]):
        counts[SyncState(state)] = int(count)
    return counts
