"""An ECG finished while the node's disk is full: the box is told NAK STORAGE and keeps it, nothing
half-written stays behind, the bridge carries on, and once there is room the box's next offer
is kept exactly once. As for a C-STORE, retention first evicts what the cloud already holds.

The data dir is a real, size-limited filesystem (a tmpfs the test mounts, as in
tests/edge/test_bad_input.py and tests/sync/test_retention.py); skipped where mount is not allowed.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.node.config import EdgeConfig, parse_config
from edge.node.services import build_services
from edge.store.db import database, open_database
from edge.store.models import Instance, Outbox, utcnow
from edge.store.spool import Spool, keep_instance
from firmware_bridge.boxes import recordings
from firmware_bridge.service import BridgeService
from tests.dicom_factory import make_dx
from tests.firmware_bridge.conftest import BoxThread, RunningBridge
from tests.firmware_bridge.helpers import kept_dataset, kept_recordings
from tests.small_disk import fill, mounted_tmpfs
from tests.waiting import wait_until

DISK_MB = 16


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/var`` (the bridge's data dir) on its own 16 MB filesystem."""
    with mounted_tmpfs(tmp_path / "var", DISK_MB) as mount:
        yield mount


@pytest.fixture
def store(small_disk: Path) -> Iterator[Spool]:
    """The conftest's ``store`` (and so its ``bridge``), on the small disk."""
    open_database(small_disk)
    yield Spool(small_disk)
    database.close()


def node_config(tmp_path: Path, link: Path, **storage: Any) -> EdgeConfig:
    bridge = {"ports": [str(link)], "port_glob": "", "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "silence_s": 2.0}
    return parse_config({"node": {"id": "test-node", "name": "Test Clinic"},
                         "storage": {"data_dir": str(tmp_path / "var"), **storage}, "bridge": bridge}, tmp_path)


class NodeBridge(RunningBridge):
    """The bridge exactly as ``edge serve bridge`` builds it (edge.node.build_services), on a loop thread."""

    def __init__(self, config: EdgeConfig) -> None:
        [service] = build_services(config, ["bridge"])
        assert isinstance(service, BridgeService)
        super().__init__(config, Spool(config.data_dir), service)

    def start(self) -> NodeBridge:
        super().start()
        wait_until(lambda: self.session_running(), what="bridge watching the port")
        return self

    def session_running(self) -> bool:
        return bridge_task_alive(self.service)


@pytest.fixture
def node_bridge(tmp_path: Path, link: Path) -> Iterator[Any]:
    running: list[NodeBridge] = []

    def start(**storage: Any) -> NodeBridge:
        b = NodeBridge(node_config(tmp_path, link, **storage)).start()
        running.append(b)
        return b

    yield start
    for b in running:
        b.stop()


def bridge_task_alive(service: BridgeService) -> bool:
    """The bridge's one box session still runs (a session task that died would never serve the box again)."""
    return len(service._tasks) == 1 and not any(t.done() for t in service._tasks.values())


def temp_files(spool: Spool) -> list[str]:
    return sorted(p.name for p in spool.tmp.iterdir())


def ecg_instances() -> list[Instance]:
    return list(Instance.select().where(Instance.source == "ecg"))


def outbox_rows(sop_instance_uid: str) -> int:
    return Outbox.select().join(Instance).where(Instance.sop_instance_uid == sop_instance_uid).count()


def refusal_lines(caplog: pytest.LogCaptureFixture, box_id: str, rec_id: int) -> list[str]:
    """The bridge's error lines naming the box and the recording it could not keep."""
    return [r.getMessage() for r in caplog.records if r.name == "firmware_bridge.session" and r.levelno == logging.ERROR
            and f"box {box_id} recording {rec_id} not kept" in r.getMessage()]


def assert_held_by_the_box(sim: BoxThread) -> int:
    """The box heard NAK STORAGE and still holds its recording, unacknowledged."""
    rec_id = sim.box.unacknowledged
    assert rec_id is not None
    assert sim.box.stats.naks_storage >= 1
    assert sim.box.stats.recordings_acked == []
    return rec_id


def assert_kept_exactly_once(sim: BoxThread, spool: Spool, box_id: str, rec_id: int) -> str:
    """The box's next offer was ACKed, and its recording is one instance, one outbox row, as sent."""
    stats = sim.wait(timeout=20)
    assert set(stats.recordings_acked) == {rec_id}
    assert sim.box.unacknowledged is None
    [row] = kept_recordings(box_id)
    assert row["rec_id"] == rec_id and row["samples"] == 1000 and not row["damaged"]
    uid = row["sop_instance_uid"]
    assert [i.sop_instance_uid for i in ecg_instances()] == [uid]
    assert outbox_rows(uid) == 1
    uv = kept_dataset(spool, uid).waveform_array(0)  # µV, leads I, II, III, aVR, aVL, aVF, V1-V6
    sent = np.asarray(stats.sent_samples[rec_id], dtype=float) * 2.5  # I, II, V1-V6 in µV, as the box meant them
    assert np.abs(uv[:, [0, 1, 6, 7, 8, 9, 10, 11]] - sent).max() <= 2.5  # every sample, within one LSB
    assert temp_files(spool) == []
    return uid


def test_truly_full_disk_answers_storage_and_the_next_offer_is_kept_once_there_is_room(
    store: Spool, small_disk: Path, bridge: Any, box: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    running = bridge()  # min_free_mb = 0: the write itself meets ENOSPC
    filler = fill(small_disk)  # not a byte left, not even for SQLite
    assert shutil.disk_usage(small_disk).free < 2**16
    sim = box(box_id="ECG-FULL", record_every=5.0, recordings=1).start()

    wait_until(lambda: sim.box.stats.naks_storage, timeout=15, what="NAK STORAGE to the box")
    rec_id = assert_held_by_the_box(sim)
    assert temp_files(store) == []  # the half-written ECG went
    assert ecg_instances() == [] and Outbox.select().count() == 0
    assert list(store.root.rglob("*.dcm")) == []
    lines = refusal_lines(caplog, "ECG-FULL", rec_id)
    assert lines, caplog.text
    assert "disk full" in lines[0] and "NAK STORAGE" in lines[0], lines[0]
    assert not any(r.exc_info for r in caplog.records), "a full disk is one log line, not a traceback"
    assert "Traceback" not in caplog.text
    db_lines = [r for r in caplog.records if "to the database" in r.getMessage()]
    assert len(db_lines) <= 1, [r.getMessage() for r in db_lines]  # bookkeeping failures: not a line per write
    assert bridge_task_alive(running.service)
    assert running.session.stats.connects == 1  # the port was never dropped over it
    assert running.session.stats.not_kept >= 1

    filler.unlink()
    uid = assert_kept_exactly_once(sim, store, "ECG-FULL", rec_id)
    assert running.kept and [k.sop_instance_uid for k in running.kept] == [uid]
    assert bridge_task_alive(running.service) and running.session.stats.connects == 1
    assert not any(r.exc_info for r in caplog.records)


def test_under_min_free_the_recording_is_refused_unsynced_studies_stay_and_nothing_is_lost(
    store: Spool, small_disk: Path, node_bridge: Any, box: Any, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO)
    waiting = make_dx(tmp_path / "waiting.dcm", rows=1024, cols=1024)  # 2 MB the cloud does not have yet
    shutil.copy(tmp_path / "waiting.dcm", store.tmp / "waiting.dcm")
    keep_instance(store, store.tmp / "waiting.dcm")
    running = node_bridge(min_free_mb=6, high_water_free_mb=10, retention_days=30)
    filler = fill(small_disk, leave_mb=3)  # under the minimum, but SQLite still has room

    sim = box(box_id="ECG-LOW", record_every=5.0, recordings=1).start()
    wait_until(lambda: sim.box.stats.naks_storage, timeout=15, what="NAK STORAGE to the box")
    rec_id = assert_held_by_the_box(sim)
    lines = refusal_lines(caplog, "ECG-LOW", rec_id)
    assert lines, caplog.text
    assert re.search(r"disk almost full \([23] MB free, minimum 6 MB\)", lines[0]), lines[0]
    [row] = recordings("ECG-LOW")
    assert row["state"] == "failed" and re.fullmatch(r"disk almost full \([23] MB free, minimum 6 MB\)", row["detail"])
    assert row["samples"] == 1000  # it had all arrived: refused for space alone
    assert temp_files(store) == [] and ecg_instances() == []
    # Retention was asked (the hook is wired) but evicts nothing the cloud does not hold.
    assert (store.root / waiting.StudyInstanceUID / f"{waiting.SOPInstanceUID}.dcm").exists()
    assert Instance.get(Instance.sop_instance_uid == waiting.SOPInstanceUID).evicted_at is None
    assert any("nothing more is synced to evict" in r.getMessage() for r in caplog.records)
    assert running.session_running() and running.session.stats.connects == 1
    assert not any(r.exc_info for r in caplog.records)

    filler.unlink()
    assert_kept_exactly_once(sim, store, "ECG-LOW", rec_id)
    assert running.session_running()


def test_make_room_evicts_a_synced_study_and_the_recording_is_kept_at_once(
    store: Spool, small_disk: Path, node_bridge: Any, box: Any, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO)
    synced = make_dx(tmp_path / "synced.dcm", rows=2048, cols=2048)  # 8 MB already in the cloud
    shutil.copy(tmp_path / "synced.dcm", store.tmp / "synced.dcm")
    keep_instance(store, store.tmp / "synced.dcm")
    Outbox.update(state="synced", synced_at=utcnow()).execute()
    running = node_bridge(min_free_mb=6, high_water_free_mb=10, retention_days=30)  # synced today: kept by age
    fill(small_disk, leave_mb=3)  # stays: the room comes from retention alone

    sim = box(box_id="ECG-ROOM", record_every=5.0, recordings=1).start()
    stats = sim.wait(timeout=15)
    assert stats.naks_storage == 0  # kept on the first offer: eviction made the room
    [rec_id] = set(stats.recordings_acked)
    evicted = Instance.get(Instance.sop_instance_uid == synced.SOPInstanceUID)
    assert evicted.evicted_at is not None  # the tombstone stays; the file went
    assert not (store.root / synced.StudyInstanceUID).exists()
    assert any(r.name == "sync.retention" and synced.StudyInstanceUID in r.getMessage() and "evicted" in r.getMessage()
               for r in caplog.records)
    assert refusal_lines(caplog, "ECG-ROOM", rec_id) == []
    [row] = kept_recordings("ECG-ROOM")
    assert [i.sop_instance_uid for i in ecg_instances()] == [row["sop_instance_uid"]]
    assert outbox_rows(row["sop_instance_uid"]) == 1
    assert temp_files(store) == []
    assert running.session_running()


def test_the_node_gives_the_bridge_the_same_make_room_as_the_dicom_service(tmp_path: Path) -> None:
    config = parse_config({"node": {"id": "test-node"}, "storage": {"data_dir": str(tmp_path / "plain")}}, tmp_path)
    open_database(config.data_dir)
    try:
        dicom, bridge = build_services(config, ["dicom", "bridge"])
    finally:
        database.close()
    dicom = getattr(dicom, "dicom", dicom)  # edge.node.services wraps it to write its counters for other processes
    assert bridge.make_room is not None and bridge.make_room is dicom.make_room  # type: ignore[attr-defined]


def test_a_write_error_is_nak_storage_with_the_reason_noted_and_the_next_offer_is_kept(
    store: Spool, bridge: Any, box: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO (a failing SD card) halfway through the ECG file: a tmpfs cannot do that, so it is injected."""
    from firmware_bridge import session

    real_write = session.write_ecg
    failed: list[Path] = []

    def failing_write(ds: Any, path: Path) -> None:
        if not failed:
            failed.append(path)
            path.write_bytes(b"DICM half an ECG")
            raise OSError(errno.EIO, "Input/output error")
        real_write(ds, path)

    monkeypatch.setattr(session, "write_ecg", failing_write)
    caplog.set_level(logging.INFO)
    running = bridge()
    sim = box(box_id="ECG-EIO", record_every=1.0, recordings=1).start()
    wait_until(lambda: sim.box.stats.naks_storage, timeout=15, what="NAK STORAGE to the box")
    rec_id = assert_held_by_the_box(sim)
    assert failed and not failed[0].exists() and temp_files(store) == []
    [row] = recordings("ECG-EIO")
    assert row["state"] == "failed" and row["detail"] == "could not write it: Input/output error (EIO)"
    lines = refusal_lines(caplog, "ECG-EIO", rec_id)
    assert lines and "Input/output error" in lines[0]
    assert not any(r.exc_info for r in caplog.records)
    assert running.session.stats.connects == 1 and bridge_task_alive(running.service)

    assert_kept_exactly_once(sim, store, "ECG-EIO", rec_id)  # the box's next offer
