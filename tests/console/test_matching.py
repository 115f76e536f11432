"""Images from the DR (DCMTK storescu) find their visit: by worklist UID, accession, or patient + date."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from tests.conftest import EdgeNode
from tests.console.conftest import TECH, TECH_PASSWORD
from tests.console.helpers import ConsoleClient, set_attrs
from tests.dicom_factory import make_dx
from tests.edge.helpers import query, storescu
from tests.waiting import wait_until

TODAY = dt.date.today().strftime("%Y%m%d")


def _order(node: EdgeNode, order_id: int) -> tuple[str, str]:
    rows = query(node, "SELECT accession_number, study_instance_uid FROM \"order\" WHERE id = ?", order_id)
    return rows[0][0], rows[0][1]


def _how(node: EdgeNode, study_uid: str) -> tuple[Any, ...] | None:
    rows = query(node, "SELECT m.how, m.order_id FROM study_match m JOIN study s ON s.id = m.study_id "
                       "WHERE s.study_instance_uid = ?", study_uid)
    return rows[0] if rows else None


def _dx(tmp: Path, name: str, **attrs: str) -> tuple[Path, str]:
    path = tmp / f"{name}.dcm"
    ds = make_dx(path, rows=64, cols=64, accession=attrs.pop("AccessionNumber", ""), study_uid=attrs.pop("study_uid", None))
    if attrs:
        set_attrs(path, **attrs)
    return path, str(ds.StudyInstanceUID)


def test_images_with_the_orders_accession_arrive_matched_and_others_can_be_assigned(
    cnode: EdgeNode, tmp_path: Path
) -> None:
    client = ConsoleClient(cnode)
    assert client.login(TECH, TECH_PASSWORD) == 303
    first = client.register(surname="Dlamini", given_names="Thandi", id_number="8001015009087")
    accession, _ = _order(cnode, first)

    matched, matched_uid = _dx(tmp_path, "matched", AccessionNumber=accession)
    stray, stray_uid = _dx(tmp_path, "stray", PatientID="WALK-IN-9")
    result = storescu(cnode, matched, stray)
    assert result.returncode == 0, result.stdout + result.stderr

    # Matching runs every few seconds: it may look at the two studies in two passes, so wait for both.
    today = wait_until(lambda: (t := client.today())["visits"][str(first)].startswith("received|")
                       and t["unmatched"] and t, 20, "the visit received and the stray flagged on Today", every=0.2)
    assert today["visits"][str(first)].startswith("received|0||0|1|")  # 1 instance, waiting to upload (sync off)
    assert _how(cnode, matched_uid) == ("accession", first)
    assert today["unmatched"] == [stray_uid]
    assert _how(cnode, stray_uid) == ("none", None)
    _, page = client.get("/")
    assert "Images without a visit" in page and "WALK-IN-9" in page

    status, _, headers = client.post("/assign", {"study": stray_uid, "order": str(first)})
    assert status == 303 and headers["Location"] == "/?msg=assigned"
    today = client.today()
    assert today["unmatched"] == []
    assert today["visits"][str(first)].startswith("received|0||0|2|")  # both studies now count for the visit
    assert _how(cnode, stray_uid) == ("assigned", first)
    audit = query(cnode, "SELECT user, action, accession_number FROM order_audit WHERE action IN ('register', 'assign') "
                         "ORDER BY id")
    assert audit == [(TECH, "register", accession), (TECH, "assign", accession)]


def test_worklist_uid_and_patient_with_date_match_without_an_accession(cnode: EdgeNode, tmp_path: Path) -> None:
    client = ConsoleClient(cnode)
    assert client.login(TECH, TECH_PASSWORD) == 303
    by_uid = client.register(surname="Nkosi", given_names="Sipho", sex="M", folder_number="F-1234",
                             birth_date="1975-03-02")
    by_patient = client.register(surname="Mokoena", sex="F", folder_number="F-77", birth_date="1990-07-15",
                                 exam="Knee X-ray")
    _, order_uid = _order(cnode, by_uid)
    # The DR took the study UID from the worklist but left the accession out.
    from_worklist, uid1 = _dx(tmp_path, "wl", study_uid=order_uid, PatientID="F-1234")
    # Typed by hand at the DR: right folder number, today's date, no accession.
    by_hand, uid2 = _dx(tmp_path, "hand", PatientID="F-77", StudyDate=TODAY)
    # Same folder number on another day: not this visit.
    old, uid3 = _dx(tmp_path, "old", PatientID="F-77", StudyDate="20200101")
    assert storescu(cnode, from_worklist, by_hand, old).returncode == 0
    today = wait_until(lambda: all(_how(cnode, u) for u in (uid1, uid2, uid3)) and client.today(), 20,
                       "all three studies looked at by matching", every=0.2)
    assert _how(cnode, uid1) == ("study_uid", by_uid)
    assert _how(cnode, uid2) == ("patient_date", by_patient)
    assert today["unmatched"] == [uid3]
