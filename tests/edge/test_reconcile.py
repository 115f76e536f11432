"""Start-up reconciliation: what a power cut or disk trouble leaves behind is put right.

Each test works on a stopped node's data dir, as the field engineer or the power cut left
it, then starts the node and checks what the technician would: ``edge studies``,
``edge status`` and the files.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

from tests.conftest import EdgeNode, edge_cli
from tests.dicom_factory import DX_STORAGE, make_dx
from tests.edge.helpers import echo_succeeds, outbox_rows_for, raw_store, spool_files, storescu, temp_files
from tests.edge.hostile_files import write_element_flood
from tests.edge.test_dicom_ingest import dataset_bytes


def stopped_node_with_one_instance(node_factory: Any, tmp_path: Path) -> tuple[EdgeNode, Any]:
    node = node_factory().start()
    ds = make_dx(tmp_path / "a.dcm", rows=256, cols=256)
    assert "Received Store Response (Success)" in storescu(node, tmp_path / "a.dcm").stderr
    assert node.stop() == 0
    return node, ds


def problems_besides_the_printer(status: str) -> list[str]:
    """`edge status` PROBLEM lines; this machine's CUPS (no scheduler in a bare test box) is not the store's."""
    return [line for line in status.splitlines() if line.startswith("PROBLEM") and "printer (" not in line]


def test_spool_file_without_rows_is_indexed_and_queued_at_start(node_factory: Any, tmp_path: Path) -> None:
    # The power cut came after the rename into place but before the rows were committed.
    node = node_factory()
    ds = make_dx(tmp_path / "a.dcm", rows=256, cols=256, accession="RECON1")
    place = node.data_dir / "spool" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    place.parent.mkdir(parents=True)
    shutil.copyfile(tmp_path / "a.dcm", place)

    node.start()
    studies = node.studies()
    assert [(s["study_instance_uid"], s["accession_number"], s["instances"], s["sync_state"]) for s in studies] == [
        (ds.StudyInstanceUID, "RECON1", 1, "pending")
    ]
    assert outbox_rows_for(node, ds.SOPInstanceUID) == 1
    assert dataset_bytes(place) == dataset_bytes(tmp_path / "a.dcm")
    assert "1 spool file(s) indexed" in node.log_text()
    assert node.status()["outbox"]["depth"] == 1


def test_deleted_instance_file_is_reported_missing_after_restart(node_factory: Any, tmp_path: Path) -> None:
    node, ds = stopped_node_with_one_instance(node_factory, tmp_path)
    (node.data_dir / "spool" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm").unlink()

    node.start()
    assert node.status()["store"]["files_missing"] == 1
    human = edge_cli(node.config, "status").stdout
    assert "PROBLEM   1 instance file(s) missing from the spool" in human
    assert echo_succeeds(node)


def test_file_put_back_clears_the_missing_flag(node_factory: Any, tmp_path: Path) -> None:
    node, ds = stopped_node_with_one_instance(node_factory, tmp_path)
    kept = node.data_dir / "spool" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    backup = tmp_path / "backup.dcm"
    shutil.move(kept, backup)
    node.start()
    assert node.status()["store"]["files_missing"] == 1
    assert node.stop() == 0

    shutil.move(backup, kept)  # the engineer restores it from the SD card backup
    node.start()
    assert node.status()["store"]["files_missing"] == 0
    assert problems_besides_the_printer(edge_cli(node.config, "status").stdout) == []


def test_evicted_instance_is_not_reported_missing(node_factory: Any, tmp_path: Path) -> None:
    node, ds = stopped_node_with_one_instance(node_factory, tmp_path)
    # Retention removed the file after the cloud had it, and marked the row so.
    (node.data_dir / "spool" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm").unlink()
    with sqlite3.connect(node.data_dir / "edge.db") as conn:
        conn.execute(
            "update instance set evicted_at = '2026-11-01 10:00:00' where sop_instance_uid = ?", (ds.SOPInstanceUID,)
        )
    conn.close()

    node.start()
    assert node.status()["store"]["files_missing"] == 0
    assert problems_besides_the_printer(edge_cli(node.config, "status").stdout) == []
    assert "missing from the spool" not in node.log_text()


def test_eviction_cut_short_by_a_power_cut_is_finished_at_start(node_factory: Any, tmp_path: Path) -> None:
    node, ds = stopped_node_with_one_instance(node_factory, tmp_path)
    kept = node.data_dir / "spool" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    # Retention committed the eviction; the power went before it deleted the file.
    with sqlite3.connect(node.data_dir / "edge.db") as conn:
        conn.execute(
            "update instance set evicted_at = '2026-11-01 10:00:00' where sop_instance_uid = ?", (ds.SOPInstanceUID,)
        )
    conn.close()
    assert kept.exists()

    node.start()
    assert not kept.exists()
    assert node.status()["store"]["files_missing"] == 0
    assert [s["instances"] for s in node.studies()] == [1]  # the row stays as the tombstone


def test_stray_temp_file_is_removed_at_start(node_factory: Any, tmp_path: Path) -> None:
    node, _ = stopped_node_with_one_instance(node_factory, tmp_path)
    stray = node.data_dir / "tmp" / "tmpab12cd34.dcm"
    stray.write_bytes(b"\0" * 128 + b"DICM" + b"half a transfer")

    node.start()
    assert not stray.exists()
    assert temp_files(node) == []
    assert "1 temp file(s) removed" in node.log_text()
    assert [s["instances"] for s in node.studies()] == [1]  # the kept instance is untouched


def test_unreadable_spool_file_is_set_aside_and_node_starts(node_factory: Any, tmp_path: Path) -> None:
    node, ds = stopped_node_with_one_instance(node_factory, tmp_path)
    broken_dir = node.data_dir / "spool" / "1.2.826.0.1.3680043.8.498.99"
    broken_dir.mkdir()
    (broken_dir / "1.2.826.0.1.3680043.8.498.100.dcm").write_bytes(b"not dicom at all, an SD card gone bad" * 50)

    node.start()
    assert echo_succeeds(node)
    aside = node.data_dir / "unreadable" / "1.2.826.0.1.3680043.8.498.99__1.2.826.0.1.3680043.8.498.100.dcm"
    assert aside.exists()
    assert not (broken_dir / "1.2.826.0.1.3680043.8.498.100.dcm").exists()
    assert [s["study_instance_uid"] for s in node.studies()] == [ds.StudyInstanceUID]
    assert len(spool_files(node)) == 1
    assert "1 unreadable" in node.log_text()
    assert node.status()["store"]["files_missing"] == 0


def test_a_spool_file_over_the_configured_limits_is_set_aside_not_indexed(node_factory: Any, tmp_path: Path) -> None:
    """Start-up reconcile decodes under the configured [storage] limits, as C-STORE does (it used the
    defaults: 200 000 elements here would have been indexed and uploaded though C-STORE refuses it)."""
    node = node_factory(storage={"max_elements": 1000})
    study = "1.2.826.0.1.3680043.8.498.77"
    flood = tmp_path / "flood.dcm"
    sop = write_element_flood(flood, elements=5000, study_uid=study)
    place = node.data_dir / "spool" / study / f"{sop}.dcm"
    place.parent.mkdir(parents=True)
    shutil.copyfile(flood, place)

    node.start()
    assert echo_succeeds(node)
    assert node.studies() == []
    assert (node.data_dir / "unreadable" / f"{study}__{sop}.dcm").exists()
    assert "1 unreadable" in node.log_text()
    assert "[storage] max_elements" in node.log_text()
    status, comment = raw_store(node, flood, DX_STORAGE)  # the same file as a C-STORE: the same limit
    assert status == 0xA700 and "max_elements" in comment, comment
