"""Start-up reconciliation of spool and database, so a power cut at any instant loses nothing.

A power cut can leave: a temp file of an unfinished C-STORE (never acknowledged: remove),
a file renamed into place whose rows were not committed (not acknowledged, but complete:
index and queue it), or a row whose file is gone (disk trouble: flag it for ops; unless
retention evicted it on purpose after the cloud had it, see ``Instance.evicted_at``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from edge.store.const import UNREADABLE_DIR
from edge.store.db import write_transaction
from edge.store.models import Instance, log_event
from edge.store.spool import RejectedInstance, Spool, keep_instance
from edge.store.walk import DecodeLimits

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    temp_files_removed: int = 0
    files_indexed: int = 0
    files_unreadable: int = 0
    rows_missing_file: int = 0
    evicted_files_removed: int = 0


def _remove_temp_files(spool: Spool) -> int:
    removed = 0
    for entry in spool.tmp.iterdir():
        if entry.is_file():
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def _set_aside(spool: Spool, path: Path, reason: str) -> None:
    """Keep an unreadable file for a human to look at, out of the spool's way."""
    target_dir = spool.root.parent / UNREADABLE_DIR
    target_dir.mkdir(exist_ok=True)
    os.replace(path, target_dir / f"{path.parent.name}__{path.name}")
    log.error("spool file %s is unreadable (%s): moved to %s", path.name, reason, target_dir)


def reconcile(spool: Spool, limits: DecodeLimits | None = None) -> ReconcileReport:
    """Make spool and database agree; run before the DICOM service accepts associations.

    ``limits``: the configured ``[storage]`` decode limits (``DecodeLimits.from_storage``), as
    C-STORE applies them: a file left in the spool is indexed only if C-STORE would have kept it.
    """
    report = ReconcileReport(temp_files_removed=_remove_temp_files(spool))
    known = {
        row.path: row
        for row in Instance.select(Instance.id, Instance.path, Instance.file_missing, Instance.evicted_at)
    }
    seen: set[str] = set()
    for path in sorted(spool.root.glob("*/*.dcm")):
        relative = f"{path.parent.name}/{path.name}"
        seen.add(relative)
        if relative in known:
            if known[relative].evicted_at is not None:
                # Retention committed the eviction, then the power went before the delete.
                path.unlink(missing_ok=True)
                report.evicted_files_removed += 1
            continue
        try:
            kept = keep_instance(spool, path, source="reconcile", limits=limits)
        except RejectedInstance as exc:
            _set_aside(spool, path, exc.reason)
            report.files_unreadable += 1
            continue
        if kept.duplicate:
            continue
        report.files_indexed += 1
        log.warning("reconcile: indexed spool file %s of study %s (no row after power cut)", kept.sop_instance_uid, kept.study_instance_uid)
    # An evicted instance's file was removed on purpose (retention, after the cloud had it):
    # its row is a tombstone, not a missing file.
    missing = [row for path, row in known.items() if path not in seen and row.evicted_at is None]
    back = [row for path, row in known.items() if row.file_missing and (path in seen or row.evicted_at is not None)]
    with write_transaction():
        for row in missing:
            if not row.file_missing:
                Instance.update(file_missing=True).where(Instance.id == row.id).execute()
                log_event("file_missing", row.path)
                log.error("reconcile: instance file %s is missing from the spool", row.path)
        for row in back:
            Instance.update(file_missing=False).where(Instance.id == row.id).execute()
    report.rows_missing_file = len(missing)
    return report
