"""The store on a disk so full that SQLite itself cannot write: the error says so.

SQLite rolls a transaction back on its own when the disk fills; peewee's rollback then
fails with "no transaction is active". Unless the store digs out the real cause, a DR is
answered 0xC001 (processing failure) instead of 0xA700 (Out of Resources, what a
technician can act on), and the ECG bridge logs a riddle instead of "disk full".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.store.db import database, open_database
from edge.store.models import Instance
from edge.store.spool import RejectedInstance, Spool, keep_instance
from tests.dicom_factory import make_dx
from tests.small_disk import fill, mounted_tmpfs


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "var", 8) as data_dir:
        open_database(data_dir)
        try:
            yield data_dir
        finally:
            database.close()


def test_database_write_on_a_full_disk_refuses_with_out_of_resources_and_keeps_nothing(disk: Path) -> None:
    spool = Spool(disk)
    for seed in range(3):  # the node has been working: the database has rows and a WAL
        make_dx(spool.tmp / f"earlier{seed}.dcm", rows=64, cols=64, seed=seed)
        keep_instance(spool, spool.tmp / f"earlier{seed}.dcm")
    arriving = spool.tmp / "arriving.dcm"
    ds = make_dx(arriving, rows=64, cols=64, seed=9)  # received whole; then the disk fills
    fill(disk)

    with pytest.raises(RejectedInstance) as refused:
        keep_instance(spool, arriving)
    assert refused.value.status == 0xA700, refused.value.reason
    assert "full" in refused.value.reason
    assert "no transaction is active" not in refused.value.reason
    assert Instance.select().count() == 3
    assert Instance.get_or_none(Instance.sop_instance_uid == ds.SOPInstanceUID) is None
    assert arriving.exists()  # still the caller's: taken back out of the spool, not half-kept
    assert not list(spool.root.rglob(f"{ds.SOPInstanceUID}.dcm"))
