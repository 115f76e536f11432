"""The "not ready" screen tells the truth about where the report is (issue 14).

Before, a patient whose images had just reached the cloud read "please come back
tomorrow" (the configured 24 h turnaround less the time since the X-ray). Now the
answer follows the study: images still on their way, with the doctor, a draft being
written, or overdue. Checked on a real store, with the outbox rows as ingest and the
uploader leave them, in all five languages.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from edge.store.db import open_database, write_transaction
from edge.store.models import Outbox, Study, utcnow
from kiosk.config import LANGUAGES
from kiosk.i18n import load_catalog
from kiosk.pages import not_ready_text
from kiosk.tickets import GuardSettings, issue_ticket, look_up
from sync.tables import Report
from tests.sync.test_reports import mark_synced, receive

RULES = GuardSettings(report_estimate_hours=24.0)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    data_dir = tmp_path / "var"
    open_database(data_dir)
    return data_dir


def _ask(data_dir: Path, accession: str) -> tuple[str, float]:
    ticket = issue_ticket(accession, "Lerato Mokoena", "Chest X-ray")
    answer = look_up(ticket.code, ticket.pin, "127.0.0.1", RULES, data_dir)
    assert answer.outcome == "not_ready" and answer.estimate_hours is not None
    return answer.wait, answer.estimate_hours


def test_images_with_the_doctor_mean_later_today_and_overdue_means_reception(store: Path) -> None:
    image = receive(store, None, synced=False)
    accession = str(image.AccessionNumber)
    assert _ask(store, accession)[0] == "uploading"  # still on the node: the old hours estimate stands

    mark_synced(str(image.StudyInstanceUID))
    wait, hours = _ask(store, accession)
    assert wait == "with_doctor" and hours > 23
    for lang in LANGUAGES:
        t = load_catalog(lang)
        assert not_ready_text(t, hours, wait) == t("not_ready_with_doctor") != t("not_ready_tomorrow"), lang

    with write_transaction():  # a day and more since the images reached the cloud
        Outbox.update(synced_at=utcnow() - dt.timedelta(hours=30)).execute()
    wait, _ = _ask(store, accession)
    assert wait == "overdue"
    assert not_ready_text(load_catalog("en"), 0, wait) == "Your report is taking longer than usual. Please ask at reception."


def test_a_draft_in_means_the_doctor_is_writing_it_and_nothing_of_it_reaches_the_patient(store: Path) -> None:
    image = receive(store, None, synced=True)
    study = Study.get(Study.study_instance_uid == str(image.StudyInstanceUID))
    with write_transaction():
        Report.create(study=study, sop_instance_uid="1.2.3.99", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11",
                      kind="sr", text="Query fracture.", dicom_path="x.dcm", verification_flag="UNVERIFIED",
                      completion_flag="PARTIAL", content_datetime="20261124090000", reported_at="20261124090000")
    wait, _ = _ask(store, str(image.AccessionNumber))
    assert wait == "writing"
    for lang in LANGUAGES:
        text = not_ready_text(load_catalog(lang), 1.0, wait)
        assert text == load_catalog(lang)("not_ready_writing") and "fracture" not in text.lower(), lang
