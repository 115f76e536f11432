"""Retention on a small, size-limited data disk (a tmpfs the test mounts): evict only what the
cloud holds, oldest first; when nothing is left to evict, C-STORE answers Out of Resources."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EdgeNode
from tests.peers.orthanc import OrthancPeer
from tests.small_disk import mounted_tmpfs
from tests.sync.test_outbox import FAST_REPORTS, FAST_SYNC, all_synced, dx_series, uids
from tests.waiting import wait_until

DISK_MB = 40


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "disk", DISK_MB) as mount:
        yield mount


def spool_files(node: EdgeNode) -> set[str]:
    return {p.stem for p in (node.data_dir / "spool").rglob("*.dcm")}


def healthz(node: EdgeNode) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.console_port}/healthz", timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_full_disk_evicts_synced_studies_oldest_first_and_never_unsynced(
    node_factory: Any, orthanc: OrthancPeer, small_disk: Path, tmp_path: Path
) -> None:
    node = node_factory(
        command=("run",), cloud={"dicomweb_url": orthanc.dicomweb_url}, sync=FAST_SYNC, reports=FAST_REPORTS,
        storage={"data_dir": str(small_disk / "var"), "min_free_mb": 10, "high_water_free_mb": 22, "retention_days": 30},
    )
    node.data_dir = small_disk / "var"
    node.start()
    # ~2 MB per instance (1024 x 1024 x 16 bit).
    study_a = dx_series(tmp_path / "a", 5, size=1024, accession="A")
    assert node.storescu(*study_a).returncode == 0
    wait_until(lambda: all_synced(node, 1), what="study A synced")
    assert set(uids(study_a)) <= spool_files(node)  # plenty of room: kept locally

    study_b = dx_series(tmp_path / "b", 5, size=1024, accession="B")
    assert node.storescu(*study_b).returncode == 0
    wait_until(lambda: all_synced(node, 2), what="study B synced")
    # Below the high-water mark: the oldest synced study (A) goes, B stays.
    wait_until(lambda: not (set(uids(study_a)) & spool_files(node)), what="study A evicted")
    assert set(uids(study_b)) <= spool_files(node)
    assert {s["accession_number"]: s["sync_state"] for s in node.studies()} == {"A": "synced", "B": "synced"}

    # The cloud goes away; scanning goes on until the disk is truly full.
    orthanc.stop()
    study_c = dx_series(tmp_path / "c", 18, size=1024, accession="C")
    result = node.storescu(*study_c)
    out = result.stdout + result.stderr
    assert "Refused: OutOfResources" in out, out[-2000:]
    acknowledged = out.count("Received Store Response (Success)")
    assert 0 < acknowledged < len(study_c)
    kept_c = set(uids(study_c)) & spool_files(node)
    assert len(kept_c) == acknowledged  # everything acknowledged is still here: nothing unsynced evicted

    status, body = healthz(node)
    assert status == 503
    assert body["checks"]["disk"]["ok"] is False
    assert "Out of Resources" in body["checks"]["disk"]["detail"]

    # A re-send of an evicted instance is recognised by its tombstone: Success, not kept again.
    again = node.storescu(study_a[0])
    assert "Received Store Response" in again.stdout + again.stderr
    assert uids(study_a[:1])[0] not in spool_files(node)

    orthanc.start()
    wait_until(lambda: {s["accession_number"]: s["sync_state"] for s in node.studies()}.get("C") == "synced",
               what="study C synced once the cloud is back", timeout=90)
    assert set(uids(study_a) + uids(study_b)) | kept_c == set(orthanc.sop_instance_uids())
    assert len(orthanc.sop_instance_uids()) == 10 + acknowledged
    wait_until(lambda: healthz(node)[0] == 200, what="healthy again after eviction", timeout=90)


def test_synced_studies_are_kept_for_retention_days_and_unsynced_ones_forever(tmp_path: Path) -> None:
    import datetime as dt

    from edge.store.db import open_database
    from edge.store.models import Instance, Outbox
    from edge.store.spool import Spool, keep_instance
    from sync.retention import enforce_retention

    open_database(tmp_path / "var")
    spool = Spool(tmp_path / "var")

    def kept(accession: str, synced_days_ago: float | None) -> str:
        (tmp_path / accession).mkdir()
        path = dx_series(tmp_path / accession, 1, size=64, accession=accession)[0]
        copy = spool.tmp / f"{accession}.dcm"
        copy.write_bytes(path.read_bytes())
        uid = keep_instance(spool, copy).sop_instance_uid
        if synced_days_ago is not None:
            when = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=synced_days_ago)
            Outbox.update(state="synced", synced_at=when).where(
                Outbox.instance == Instance.get(Instance.sop_instance_uid == uid)
            ).execute()
        return uid

    old_synced = kept("OLD", synced_days_ago=31)
    recent_synced = kept("RECENT", synced_days_ago=2)
    old_unsynced = kept("WAITING", synced_days_ago=None)
    Outbox.update(created_at=dt.datetime(2020, 1, 1)).where(Outbox.state == "pending").execute()

    result = enforce_retention(spool, retention_days=30, high_water_free_mb=0)
    on_disk = {p.stem for p in spool.root.rglob("*.dcm")}
    assert on_disk == {recent_synced, old_unsynced}
    assert (result.studies, result.instances) == (1, 1)
    tombstone = Instance.get(Instance.sop_instance_uid == old_synced)
    assert tombstone.evicted_at is not None  # the row stays: a re-send is recognised

    again = spool.tmp / "again.dcm"
    again.write_bytes((tmp_path / "OLD" / "0.dcm").read_bytes())
    assert keep_instance(spool, again).duplicate is True
    assert old_synced not in {p.stem for p in spool.root.rglob("*.dcm")}
