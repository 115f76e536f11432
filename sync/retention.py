"""Retention: free the disk of studies the cloud already holds, oldest first, never anything unsynced.

A study is evictable only when every one of its instances is ``synced``. Eviction commits
first (``instance.evicted_at`` set: the row stays as the tombstone that recognises a
re-send) and deletes files after, so a power cut in between leaves files that start-up
reconciliation finishes deleting, never rows pointing at nothing unsynced. Only on a disk
filled to the last byte, where SQLite cannot write, are the (synced) files deleted first.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from dataclasses import dataclass

from peewee import DatabaseError, fn

from edge.store.const import SyncState
from edge.store.db import write_transaction
from edge.store.models import Instance, Outbox, Study, log_event, utcnow
from edge.store.rows import rows
from edge.store.spool import Spool, is_out_of_space

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionResult:
    studies: int
    instances: int
    bytes_freed: int


def evictable_studies(older_than: dt.datetime | None = None) -> list[Study]:
    """Studies whose every local instance is in the cloud, oldest last-sync first."""
    not_synced = (
        Instance.select(Instance.study)
        .join(Outbox)
        .where(Outbox.state != SyncState.SYNCED)
    )
    kept = (
        Instance.select(Instance.study, fn.MAX(Outbox.synced_at).alias("last_sync"))
        .join(Outbox)
        .where(Instance.evicted_at.is_null(True), Instance.study.not_in(not_synced))
        .group_by(Instance.study)
    )
    if older_than is not None:
        kept = kept.having(fn.MAX(Outbox.synced_at) < older_than)
    ids = [study_id for study_id, _ in rows(kept.order_by(fn.MAX(Outbox.synced_at)), tuple[int, dt.datetime])]
    by_id = {s.id: s for s in Study.select().where(Study.id.in_(ids))} if ids else {}
    return [by_id[i] for i in ids if i in by_id]


def _synced_rows(study: Study) -> list[Instance]:
    return list(
        Instance.select(Instance.id, Instance.path, Instance.size)
        .join(Outbox)
        .where(Instance.study == study.id, Instance.evicted_at.is_null(True), Outbox.state == SyncState.SYNCED)
    )


def _mark_evicted(study: Study, rows: list[Instance], when: dt.datetime) -> None:
    Instance.update(evicted_at=when).where(Instance.id.in_([r.id for r in rows])).execute()
    log_event("evicted", f"{len(rows)} instance(s) freed after sync", study.study_instance_uid)


def _delete_files(spool: Spool, study: Study, rows: list[Instance]) -> int:
    freed = 0
    for row in rows:
        path = spool.root / row.path
        try:
            freed += path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            pass
    try:
        (spool.root / study.study_instance_uid).rmdir()
    except OSError:
        pass  # not empty (an instance arrived meanwhile) or already gone
    return freed


def evict_study(spool: Spool, study: Study) -> tuple[int, int]:
    """Remove a synced study's files; return (instances, bytes). Rows stay as tombstones."""
    now = utcnow()
    try:
        with write_transaction():
            rows = _synced_rows(study)
            if not rows:
                return 0, 0
            _mark_evicted(study, rows, now)
    except DatabaseError as exc:
        if not is_out_of_space(exc):
            raise
        return _evict_on_a_full_disk(spool, study, now)
    freed = _delete_files(spool, study, rows)
    log.info("retention: study %s evicted locally (%d instance(s), %d bytes; it is in the cloud)", study.study_instance_uid, len(rows), freed)
    return len(rows), freed


def _evict_on_a_full_disk(spool: Spool, study: Study, when: dt.datetime) -> tuple[int, int]:
    """Something else filled the disk to the last byte: SQLite cannot even write the tombstone.

    These files are in the cloud, so deleting them first loses nothing; the tombstone then
    goes into the room they leave. Should that write still fail, start-up reconciliation
    reports the files missing (the cloud still has them) rather than anything being lost.
    """
    rows = _synced_rows(study)
    if not rows:
        return 0, 0
    freed = _delete_files(spool, study, rows)
    log.warning("retention: disk full to the last byte: study %s deleted before its tombstone (%d bytes; it is in the cloud)",
                study.study_instance_uid, freed)
    try:
        with write_transaction():
            _mark_evicted(study, rows, when)
    except DatabaseError as exc:
        log.error("retention: study %s deleted, but its tombstone could not be written: %s", study.study_instance_uid, exc)
    return len(rows), freed


def enforce_retention(spool: Spool, retention_days: int, high_water_free_mb: int) -> RetentionResult:
    """Evict synced studies past retention, then more (oldest first) while free space is low."""
    studies = instances = freed = 0
    cutoff = utcnow() - dt.timedelta(days=retention_days)
    for study in evictable_studies(older_than=cutoff):
        n, b = evict_study(spool, study)
        studies, instances, freed = studies + (n > 0), instances + n, freed + b
    if _free_mb(spool) < high_water_free_mb:
        for study in evictable_studies():
            if _free_mb(spool) >= high_water_free_mb:
                break
            n, b = evict_study(spool, study)
            studies, instances, freed = studies + (n > 0), instances + n, freed + b
        if _free_mb(spool) < high_water_free_mb:
            log.warning(
                "retention: %.0f MB free, under the %d MB high-water mark, and nothing more is synced to evict",
                _free_mb(spool), high_water_free_mb,
            )
    return RetentionResult(studies, instances, freed)


def _free_mb(spool: Spool) -> float:
    return shutil.disk_usage(spool.root).free / 2**20
