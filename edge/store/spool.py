"""The durable ingest path: Part 10 file fsynced and renamed into place, then rows committed.

Used by the DICOM service (C-STORE), the ECG bridge and start-up reconciliation alike, so
there is one definition of "safely kept": only after :func:`keep_instance` returns may the
sender be told Success.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from peewee import DatabaseError

from edge.dicom_uid import is_uid
from edge.files import fsync_dir, publish
from edge.store.const import ECG_SOP_CLASSES, PRIORITY_ECG, PRIORITY_ROUTINE, SPOOL_DIR, TMP_DIR, SyncState
from edge.store.db import write_transaction
from edge.store.models import Instance, Outbox, Series, Study, log_event, utcnow

if TYPE_CHECKING:
    from edge.store.walk import DecodeLimits

log = logging.getLogger(__name__)

_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "AccessionNumber",
    "PatientID",
    "StudyDate",
    "Modality",
]


@cache
def _wanted_tags() -> frozenset[int]:
    """The values the walk keeps; the character set so that they decode as the sender wrote them."""
    from pydicom.datadict import tag_for_keyword

    return frozenset(int(tag_for_keyword(name) or 0) for name in [*_HEADER_TAGS, "SpecificCharacterSet"])


class RejectedInstance(Exception):
    """The dataset cannot be kept; ``status`` is the DICOM status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying attributes read from a received file's header."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax: str
    accession_number: str
    patient_id: str
    study_date: str
    modality: str


@dataclass(frozen=True)
class KeptInstance:
    sop_instance_uid: str
    study_instance_uid: str
    duplicate: bool


class Spool:
    """Where instance files live: ``<data_dir>/spool/<study uid>/<sop uid>.dcm``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / SPOOL_DIR
        self.tmp = data_dir / TMP_DIR  # same filesystem, so rename is atomic
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def relative_path(self, header: InstanceHeader) -> str:
        return f"{header.study_instance_uid}/{header.sop_instance_uid}.dcm"

    def path_of(self, instance: Instance) -> Path:
        return self.root / instance.path

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 2**20


def _text(value: object) -> str:
    return str(value).strip() if value is not None else ""


def read_header(path: Path, limits: DecodeLimits | None = None) -> InstanceHeader:
    """Read the identifying attributes, and refuse a dataset that is not whole or costs too much to decode.

    One bounded walk (:func:`edge.store.walk.walk_instance`): element headers only,
    values skipped, a deflated dataset inflated a chunk at a time. Over ``limits`` (size,
    deflate ratio, element count) is 0xA700; truncated, garbage after it, elements out of
    order, a broken deflate stream is 0xC000.
    """
    # pydicom (and numpy and PIL with it) only where a file is read: the console and ops
    # services use the spool without, and each import costs seconds on the box's CPU.
    from edge.store.walk import DecodeLimits, Malformed, OverLimit, walk_instance

    limits = limits or DecodeLimits()
    try:
        walked = walk_instance(path, limits, _wanted_tags())
    except OverLimit as exc:
        raise RejectedInstance(0xA700, exc.reason) from None
    except Malformed as exc:
        raise RejectedInstance(0xC000, exc.reason) from None
    except OSError as exc:
        raise RejectedInstance(0xC000, f"cannot parse dataset: {exc.strerror or exc}") from None
    try:
        values = {name: _text(walked.header.get(name)) for name in _HEADER_TAGS}
    except Exception as exc:  # a value that does not decode (bad VR, charset, number): pydicom's many errors
        raise RejectedInstance(0xC000, f"cannot parse dataset: {type(exc).__name__}") from None
    for name in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        uid = values[name]
        if not uid:
            raise RejectedInstance(0xA900, f"dataset has no {name}")
        if not is_uid(uid):
            raise RejectedInstance(0xA900, f"{name} is not a valid UID: {uid[:70]!r}")
    return InstanceHeader(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        transfer_syntax=walked.transfer_syntax,
        accession_number=values["AccessionNumber"][:16],
        patient_id=values["PatientID"][:64],
        study_date=values["StudyDate"][:8],
        modality=values["Modality"][:16],
    )


# fsync runs on one of these threads while the calling thread hashes the same file, so the
# disk write and the SHA-256 overlap (both release the GIL). Sized for the associations
# that may be keeping instances at once; threads start on first use.
_FSYNC_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spool-fsync")


def _sha256_and_fsync(path: Path) -> tuple[str, int]:
    """Hash the file and force it to disk, the two at the same time.

    The hash reads the file back from the page cache while the kernel writes it out; the
    function returns only once fsync has succeeded (an fsync error is raised here). The
    file's now-clean pages are then dropped from the page cache: the spool is written once
    and read again only by the uploader, so on a small box the cache is better left to the
    database and the next incoming images (and reusing those pages keeps writes fast).
    """
    with open(path, "rb+") as f:
        fd = f.fileno()
        synced = _FSYNC_POOL.submit(os.fsync, fd)
        try:
            digest = hashlib.file_digest(f, "sha256")
            size = f.tell()
        finally:
            synced.result()  # always wait: the fd must outlive the fsync; re-raises its OSError
        try:  # only advice: the data is already on disk whatever happens here
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass
    return digest.hexdigest(), size


def outbox_priority(sop_class_uid: str) -> int:
    return PRIORITY_ECG if sop_class_uid in ECG_SOP_CLASSES else PRIORITY_ROUTINE


def queue_upload(instance: Instance, sop_class_uid: str) -> None:
    """The only insert into the outbox: in the instance's own transaction, so a kept instance is always queued.

    Everything after this (claims, outcomes, STAT, send now, retry) belongs to ``sync.outbox``;
    the store cannot call it (the ground imports nothing above it), hence this one exception.
    """
    Outbox.create(instance=instance, priority=outbox_priority(sop_class_uid), state=SyncState.PENDING)


def keep_instance(
    spool: Spool,
    received: Path,
    calling_aet: str = "",
    source: str = "dicom",
    header: InstanceHeader | None = None,
    limits: DecodeLimits | None = None,
) -> KeptInstance:
    """Make a received Part 10 file durable and queue it for upload, exactly once.

    ``received`` is a complete file on the spool's filesystem (a temp file, or, during
    reconciliation, a file already in its place). ``limits`` bound what reading it may
    cost (``[storage]`` max_instance_mb, max_deflate_ratio, max_elements; defaults when
    None). Raises RejectedInstance with the status to answer; the temp file is then the
    caller's to remove.
    """
    header = header or read_header(received, limits)
    relative = spool.relative_path(header)
    final = spool.root / relative
    try:
        sha256, size = _sha256_and_fsync(received)
        with write_transaction():
            existing = Instance.get_or_none(Instance.sop_instance_uid == header.sop_instance_uid)
            if existing is not None:
                _note_duplicate(existing, header, sha256)
                return KeptInstance(header.sop_instance_uid, header.study_instance_uid, duplicate=True)
            if received != final:
                _move_into_place(spool, received, final)
            _insert_rows(header, relative, size, sha256, calling_aet, source)
    except RejectedInstance:
        raise
    except (OSError, DatabaseError) as exc:
        # Nothing was committed: take the file back out so no half-kept instance remains.
        if received != final and final.exists() and not received.exists():
            os.replace(final, received)
        status = 0xA700 if is_out_of_space(exc) else 0xC001
        raise RejectedInstance(status, f"could not keep instance: {exc}") from None
    log.info(
        "kept instance %s of study %s (%s, %d bytes) from %s",
        header.sop_instance_uid,
        header.study_instance_uid,
        header.modality or "?",
        size,
        calling_aet or source,
    )
    return KeptInstance(header.sop_instance_uid, header.study_instance_uid, duplicate=False)


def is_out_of_space(exc: BaseException) -> bool:
    """ENOSPC from a file write, or SQLite's "database or disk is full" (``write_transaction`` surfaces it)."""
    return getattr(exc, "errno", None) == errno.ENOSPC or "full" in str(exc).lower()


def _note_duplicate(existing: Instance, header: InstanceHeader, sha256: str) -> None:
    if existing.sha256 != sha256:
        log_event("duplicate_differs", "kept the first copy", header.study_instance_uid, header.sop_instance_uid)
        log.warning(
            "duplicate instance %s (study %s) with different content: kept the first copy",
            header.sop_instance_uid,
            header.study_instance_uid,
        )
    else:
        log.info("duplicate instance %s (study %s): already kept", header.sop_instance_uid, header.study_instance_uid)


def _move_into_place(spool: Spool, received: Path, final: Path) -> None:
    new_dir = not final.parent.exists()
    final.parent.mkdir(parents=True, exist_ok=True)
    if new_dir:
        fsync_dir(spool.root)
    publish(received, final)


def _insert_rows(
    header: InstanceHeader, relative: str, size: int, sha256: str, calling_aet: str, source: str
) -> None:
    """Study, series, instance and outbox rows: one transaction, the caller's."""
    now = utcnow()
    study, created = Study.get_or_create(
        study_instance_uid=header.study_instance_uid,
        defaults={
            "accession_number": header.accession_number,
            "patient_id": header.patient_id,
            "study_date": header.study_date,
            "received_at": now,
        },
    )
    if not created:
        Study.update(updated_at=now).where(Study.id == study.id).execute()
    series, _ = Series.get_or_create(
        series_instance_uid=header.series_instance_uid,
        defaults={"study": study, "modality": header.modality},
    )
    instance = Instance.create(
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        study=study,
        series=series,
        path=relative,
        size=size,
        sha256=sha256,
        transfer_syntax=header.transfer_syntax,
        calling_aet=calling_aet,
        source=source,
        received_at=now,
    )
    queue_upload(instance, header.sop_class_uid)
    log_event("instance_kept", f"from {calling_aet or source}, {size} bytes", header.study_instance_uid, header.sop_instance_uid)
