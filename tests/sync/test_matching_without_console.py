"""With no console open, studies still find their visit and a STAT visit's late images still go first (issue 13).

Before, matching and raising STAT for images still arriving ran only in the console's
Today page (its GET and its poll): with no one looking, nothing was matched and a STAT
visit's late images waited behind routine ones. Here the node runs as ``edge serve dicom``
plus ``edge serve sync`` and no console process at all; the test does what the desk's
buttons would do (register a visit, mark it STAT) by calling the same functions against
the node's database and ringing the bell, as the console process does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from edge.outbox_bell import OutboxBell
from tests.conftest import EdgeNode
from tests.edge.helpers import query
from tests.peers.fault_proxy import FaultProxy
from tests.peers.orthanc import OrthancPeer
from tests.sync.test_outbox import FAST_REPORTS, FAST_SYNC, dx_series, uids
from tests.waiting import wait_until


@pytest.fixture
def proxy(orthanc: OrthancPeer) -> Iterator[FaultProxy]:
    with FaultProxy(orthanc.base_url) as p:
        yield p


@pytest.fixture
def desk(node_factory: Any, proxy: FaultProxy) -> Iterator[tuple[EdgeNode, EdgeNode]]:
    """DICOM and sync as the systemd units run them, and the test's own connection to the node's store."""
    from edge.store.db import database, open_database

    sections = {"cloud": {"dicomweb_url": proxy.url + "/dicom-web"}, "reports": FAST_REPORTS,
                "sync": {**FAST_SYNC, "concurrency": 1}}
    dicom = node_factory(**sections).start()
    sync = node_factory.another_service(dicom, ("serve", "sync")).start()
    open_database(dicom.data_dir, migrate=False)
    try:
        yield dicom, sync
    finally:
        database.close()


def _register(surname: str) -> tuple[int, str]:
    """What the console's Register button does: a visit with one chest X-ray order; (order id, accession)."""
    from edge.orders.register import ExamChoice, Patient, create_order

    patient = Patient(f"{surname}^Thandi", f"F-{surname}", "folder", "19800101", "F", ExamChoice("Chest X-ray", "DX"))
    order = create_order(patient, node_id="clinic-0042", station_ae="DR", by="thandi")
    return int(order.id), str(order.accession_number)


def _matched_order(node: EdgeNode, study_uid: str) -> tuple[Any, ...] | None:
    rows = query(node, "SELECT m.how, m.order_id FROM study_match m JOIN study s ON s.id = m.study_id "
                       "WHERE s.study_instance_uid = ?", study_uid)
    return rows[0] if rows and rows[0][1] is not None else None


def _upload_order(orthanc: OrthancPeer) -> list[str]:
    """SOP Instance UIDs in the order the cloud stored them."""
    changes = orthanc.get("/changes?limit=1000")["Changes"]
    return [orthanc.get(f"/instances/{c['ID']}")["MainDicomTags"]["SOPInstanceUID"]
            for c in changes if c["ChangeType"] == "NewInstance"]


def test_a_study_is_matched_and_a_stat_visits_late_images_go_first_with_no_console_open(
    desk: tuple[EdgeNode, EdgeNode], proxy: FaultProxy, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    from edge.console import actions

    dicom, _ = desk
    proxy.set_mode("down")  # the link is down while the clinic works: nothing reaches the cloud yet
    stat_order, stat_accession = _register("Dlamini")
    _, routine_accession = _register("Nkosi")

    routine = dx_series(tmp_path / "routine", 3, accession=routine_accession)
    assert dicom.storescu(*routine).returncode == 0
    stat_series = dx_series(tmp_path / "stat", 4, accession=stat_accession)
    first, late = stat_series[:2], stat_series[2:]
    assert dicom.storescu(*first).returncode == 0
    stat_study = str(dcmread(first[0], stop_before_pixels=True).StudyInstanceUID)

    # Matched in the database with no page ever asked for.
    assert wait_until(lambda: _matched_order(dicom, stat_study), what="the study matched") == ("accession", stat_order)

    # The technician marks the visit STAT while the DR is still sending; the console would ring the bell.
    assert actions.mark_stat(stat_order, "thandi") <= 2  # fewer only if the slot held one "sending" right then
    OutboxBell(dicom.data_dir).ring()
    assert dicom.storescu(*late).returncode == 0  # arrive after the mark, queued as routine by ingest

    stat_uids = uids(stat_series)
    marks = ",".join("?" * len(stat_uids))
    wait_until(lambda: query(dicom, "SELECT COUNT(*) FROM outbox o JOIN instance i ON i.id = o.instance_id "
                                    f"WHERE i.sop_instance_uid IN ({marks}) AND o.priority = 0", *stat_uids)[0][0]
               == len(stat_uids), what="the STAT visit's images, the late ones too, at the front of the queue")

    proxy.set_mode("pass")  # the link is back
    wait_until(lambda: orthanc.instance_count() == 7, what="everything in the cloud")
    order = _upload_order(orthanc)
    assert sorted(order) == sorted(uids(routine + stat_series))  # none lost, none twice
    assert set(order[:4]) == set(uids(stat_series)), "the STAT visit's images, late ones too, go before routine"
    assert set(order[4:]) == set(uids(routine))
    assert query(dicom, "SELECT action FROM order_audit WHERE action = 'mark_stat'") == [("mark_stat",)]
