"""Read-only views of the store that the CLI, console and metrics share."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from peewee import fn

from edge.store.const import ReportState, SyncState
from edge.store.models import Instance, Outbox, Series, Study, utcnow
from edge.store.rows import row, rows

# A study's sync state is its worst instance's: one quarantined instance needs a human.
_STATE_ORDER = (SyncState.QUARANTINED, SyncState.FAILED, SyncState.SENDING, SyncState.PENDING, SyncState.SYNCED)


def iso(value: dt.datetime | None) -> str | None:
    """UTC timestamps as ISO 8601 with Z, the format in every JSON output."""
    return value.replace(microsecond=0).isoformat() + "Z" if value else None


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    accession_number: str
    modalities: list[str]
    instances: int
    received_at: str | None
    sync_state: SyncState
    report_state: ReportState
    last_error: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def study_sync_state(states: set[SyncState]) -> SyncState:
    """Aggregate instance outbox states into the study's state."""
    for state in _STATE_ORDER:
        if state in states:
            return state
    return SyncState.PENDING


def list_studies(limit: int | None = None) -> list[StudyRow]:
    """Studies newest first with instance counts and their sync and report state."""
    studies = list(Study.select().order_by(Study.received_at.desc(), Study.id.desc()).limit(limit))
    if not studies:
        return []
    ids = [s.id for s in studies]
    counts = dict(rows(
        Instance.select(Instance.study, fn.COUNT(Instance.id)).where(Instance.study.in_(ids)).group_by(Instance.study),
        tuple[int, int],
    ))
    modalities: dict[int, set[str]] = {}
    series = Series.select(Series.study, Series.modality).where(Series.study.in_(ids))
    for study_id, modality in rows(series, tuple[int, str]):
        if modality:
            modalities.setdefault(study_id, set()).add(modality)
    states: dict[int, set[SyncState]] = {}
    errors: dict[int, str] = {}
    query = (
        Outbox.select(Instance.study, Outbox.state, Outbox.last_error)
        .join(Instance)
        .where(Instance.study.in_(ids))
    )
    for study_id, state, error in rows(query, tuple[int, str, str]):
        states.setdefault(study_id, set()).add(SyncState(state))
        if error and state in (SyncState.QUARANTINED, SyncState.FAILED):
            errors[study_id] = error
    return [
        StudyRow(
            study_instance_uid=s.study_instance_uid,
            accession_number=s.accession_number,
            modalities=sorted(modalities.get(s.id, set())),
            instances=counts.get(s.id, 0),
            received_at=iso(s.received_at),
            sync_state=study_sync_state(states.get(s.id, set())),
            report_state=ReportState(s.report_state),
            last_error=errors.get(s.id, ""),
        )
        for s in studies
    ]


@dataclass(frozen=True)
class OutboxSummary:
    by_state: dict[SyncState, int]
    oldest_pending_age_s: float | None
    last_upload_at: str | None

    @property
    def depth(self) -> int:
        """Instances still to reach the cloud (all but synced)."""
        return sum(n for state, n in self.by_state.items() if state != SyncState.SYNCED)


def outbox_summary() -> OutboxSummary:
    by_state = {SyncState(state): n for state, n in
                rows(Outbox.select(Outbox.state, fn.COUNT(Outbox.id)).group_by(Outbox.state), tuple[str, int])}
    oldest = Outbox.select(fn.MIN(Outbox.created_at)).where(Outbox.state != SyncState.SYNCED).scalar()
    last = Outbox.select(fn.MAX(Outbox.updated_at)).where(Outbox.state == SyncState.SYNCED).scalar()
    age = None
    if oldest is not None:
        oldest = oldest if isinstance(oldest, dt.datetime) else dt.datetime.fromisoformat(str(oldest))
        age = max(0.0, (utcnow() - oldest).total_seconds())
    if last is not None and not isinstance(last, dt.datetime):
        last = dt.datetime.fromisoformat(str(last))
    return OutboxSummary(by_state=by_state, oldest_pending_age_s=age, last_upload_at=iso(last))


def count_missing_files() -> int:
    return Instance.select().where(Instance.file_missing == True).count()  # noqa: E712


def count_instances() -> tuple[int, int, int]:
    """(studies, instances, bytes) kept on this node."""
    studies = Study.select().count()
    instances, size = row(Instance.select(fn.COUNT(Instance.id), fn.COALESCE(fn.SUM(Instance.size), 0)), tuple[int, int])
    return studies, instances, int(size)


def largest_instance_bytes(limit: int = 256 * 2**20) -> int:
    """The biggest instance still kept locally (capped): how much room "one more image" needs."""
    value = Instance.select(fn.MAX(Instance.size)).where(Instance.evicted_at.is_null(True)).scalar() or 0
    return min(int(value), limit)


def latest_outbox_error() -> tuple[SyncState, str] | None:
    """(state, reason) of the most recent failed or quarantined upload, for ``edge status``."""
    row = (
        Outbox.select(Outbox.state, Outbox.last_error)
        .where(Outbox.state.in_((SyncState.FAILED, SyncState.QUARANTINED)), Outbox.last_error != "")
        .order_by(Outbox.updated_at.desc())
        .tuples()
        .first()
    )
    return (SyncState(row[0]), str(row[1])) if row else None
