"""Which visit rows offer "Check for the report now", and what they say of a draft or an amendment (issue 14).

The button is offered only where the puller would act on it: every image in the cloud
and received within [reports] lookback_days (older studies are no longer watched).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

import edge.node.parts  # noqa: F401  (the store learns every part's tables from the node's registry)
from edge.console.report_notes import report_notes
from edge.orders.today import VisitRow
from edge.store.db import open_database, write_transaction
from edge.store.models import Study, utcnow
from sync.tables import Report


@pytest.fixture
def store(tmp_path: Path) -> Path:
    data_dir = tmp_path / "var"
    open_database(data_dir)
    return data_dir


def visit(order_id: int, state: str, *uids: str, problem: str = "") -> VisitRow:
    return VisitRow(order_id, f"ACC{order_id}", "NKOSI, Thandiwe", "F-1", "Chest X-ray", "DX", "09:00", False, "",
                    state, 100, problem, "", 1, uids)


def study(uid: str, days_ago: float) -> Study:
    with write_transaction():
        return Study.create(study_instance_uid=uid, received_at=utcnow() - dt.timedelta(days=days_ago))


def report(of: Study, sop: str, verified: bool, when: str, **extra: object) -> None:
    with write_transaction():
        Report.create(study=of, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11", kind="sr",
                      text=f"report {sop}", dicom_path="x.dcm", verification_flag="VERIFIED" if verified else "UNVERIFIED",
                      completion_flag="COMPLETE" if verified else "PARTIAL", content_datetime=when, reported_at=when,
                      **extra)


def test_check_now_only_where_the_puller_watches_and_drafts_and_amendments_are_said(store: Path) -> None:
    study("1.1", 0)
    draft_study = study("1.2", 1)
    report(draft_study, "9.1", False, "20261124090000", reading_doctor="Dlamini Thandi")
    amended = study("1.3", 2)
    report(amended, "9.2", True, "20261124100000", amended_after_printing=True, superseded_by="9.3")
    report(amended, "9.3", True, "20261124150000")
    study("1.4", 20)  # beyond the 14-day lookback
    study("1.5", 0)
    rows = [visit(1, "in_cloud", "1.1"), visit(2, "in_cloud", "1.2"), visit(3, "printed", "1.3"),
            visit(4, "report_ready", "1.4"), visit(5, "uploading", "1.5"), visit(6, "waiting"),
            visit(7, "in_cloud", "1.5", problem="quarantined")]

    notes = report_notes(rows, store, lookback_days=14)

    assert sorted(notes) == [1, 2, 3, 4]  # uploading, waiting and stuck visits have nothing to check yet
    assert [notes[i].can_check for i in (1, 2, 3, 4)] == [True, True, True, False]
    assert notes[2].preliminary_text == "report 9.1" and notes[2].preliminary_doctor == "Dlamini Thandi"
    assert not notes[1].preliminary_text and not notes[3].preliminary_text
    assert notes[3].amended_after_printing and not notes[2].amended_after_printing
    assert len({n.signature for n in notes.values()}) == 4  # a change in what a row says changes its signature
