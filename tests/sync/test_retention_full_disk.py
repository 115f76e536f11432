"""Retention on a disk that something else filled to the last byte.

SQLite cannot write there, not even the eviction's tombstone, so eviction as usual
(tombstone first, files after) would fail and the node would stay full for good. Synced
files are in the cloud: retention deletes them first and writes the tombstone into the
room they leave. Unsynced images are never touched.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.store.db import database, open_database
from edge.store.models import Instance, Outbox, utcnow
from edge.store.spool import Spool, keep_instance
from sync.retention import enforce_retention
from tests.dicom_factory import make_dx
from tests.small_disk import fill, mounted_tmpfs


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    with mounted_tmpfs(tmp_path / "var", 16) as disk:
        open_database(disk)
        try:
            yield Spool(disk)
        finally:
            database.close()


def _keep(spool: Spool, tmp_path: Path, name: str, size: int, seed: int) -> str:
    ds = make_dx(tmp_path / f"{name}.dcm", rows=size, cols=size, seed=seed)
    shutil.copy(tmp_path / f"{name}.dcm", spool.tmp / f"{name}.dcm")
    keep_instance(spool, spool.tmp / f"{name}.dcm")
    return str(ds.SOPInstanceUID)


def test_a_disk_full_to_the_last_byte_is_freed_of_synced_studies_and_unsynced_ones_stay(
    spool: Spool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    in_cloud = _keep(spool, tmp_path, "in_cloud", 1024, 1)  # 2 MB, already in the cloud
    Outbox.update(state="synced", synced_at=utcnow()).execute()
    waiting = _keep(spool, tmp_path, "waiting", 512, 2)  # not uploaded yet
    fill(spool.root.parent)
    assert shutil.disk_usage(spool.root).free < 4096

    with caplog.at_level(logging.WARNING, logger="sync.retention"):
        result = enforce_retention(spool, retention_days=30, high_water_free_mb=1000)

    assert (result.studies, result.instances) == (1, 1)
    assert shutil.disk_usage(spool.root).free > 1.5 * 2**20  # the synced 2 MB image's room is back (less the tombstone)
    evicted = Instance.get(Instance.sop_instance_uid == in_cloud)
    assert evicted.evicted_at is not None  # the tombstone, written into the freed room
    assert not (spool.root / evicted.path).exists()
    kept = Instance.get(Instance.sop_instance_uid == waiting)
    assert kept.evicted_at is None and (spool.root / kept.path).exists()  # never anything unsynced
    assert any("deleted before its tombstone" in r.getMessage() for r in caplog.records)
