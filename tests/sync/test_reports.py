"""The report puller against a real Orthanc: only a verified report reaches the patient, the
newest one, soon, with one query for every study waiting, and never another patient's."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

import edge.node.parts  # noqa: F401  (the store learns every part's tables from the node's registry)
from edge.store.db import database, open_database, write_transaction
from edge.store.models import EventLog, Instance, Outbox, Study, utcnow
from edge.store.spool import Spool, keep_instance
from kiosk.tables import KioskAudit
from kiosk.tickets import finish_print
from sync import reports
from sync.dicomweb import DicomWebClient, split_uid_list
from sync.reports import (
    ReportPuller,
    ReportSettings,
    amended_after_printing,
    amendment_of,
    backoff_delay,
    check_now,
    check_requested,
    current_report,
    preliminary_report,
    report_history,
    sr_text,
)
from sync.tables import MIGRATIONS, Report, ReportPoll, ReportRetry
from tests.dicom_factory import make_dx
from tests.peers.fault_proxy import FaultProxy
from tests.peers.orthanc import OrthancPeer

# The report makers live with the client's tests; the Orthanc fixture is in conftest.py.
from tests.sync.test_dicomweb import (
    DOSE_SR,
    TIMEOUT,
    make_pdf_report,
    make_text_sr,
    misbehaving_server,
    tiny_pdf,
)

SETTINGS = ReportSettings(min_backoff_s=60, max_backoff_s=3600)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "var"
    open_database(path)
    yield path
    database.close()


def receive(data_dir: Path, cloud: OrthancPeer | None, *, synced: bool = True, study_uid: str | None = None) -> Dataset:
    """A DX image kept by the node (as after a C-STORE) and, unless ``cloud`` is None, in the cloud too."""
    incoming = data_dir.parent / "incoming"
    incoming.mkdir(exist_ok=True)
    path = incoming / f"{uuid.uuid4().hex}.dcm"
    image = make_dx(path, rows=16, cols=16, study_uid=study_uid)
    if cloud is not None:
        assert cloud.upload(path)["Status"] == "Success"
    keep_instance(Spool(data_dir), path)
    if synced:
        mark_synced(str(image.StudyInstanceUID))
    return image


def mark_synced(study_uid: str) -> None:
    ids = Instance.select(Instance.id).join(Study).where(Study.study_instance_uid == study_uid)
    Outbox.update(state="synced", synced_at=utcnow()).where(Outbox.instance.in_(ids)).execute()


def publish(cloud: OrthancPeer, path: Path) -> None:
    """The reader's PACS stores a report in the cloud study."""
    assert cloud.upload(path)["Status"] == "Success"


def reader_sr(
    path: Path, image: Dataset, text: str, *, verified: bool = True, when: str = "20261124120000",
    doctor: str = "Dlamini^Thandi", replaces: Dataset | None = None,
) -> Dataset:
    """The reader's SR as a reporting system stores it: signed (VERIFIED, COMPLETE) or a draft."""
    sr = make_text_sr(path, image, text=text)
    if verified:
        observer = Dataset()
        observer.VerifyingObserverName = doctor
        observer.VerifyingOrganization = "Regional Imaging"
        observer.VerificationDateTime = when
        observer.VerifyingObserverIdentificationCodeSequence = DicomSequence([])
        sr.VerifyingObserverSequence = DicomSequence([observer])
        sr.VerificationFlag, sr.CompletionFlag = "VERIFIED", "COMPLETE"
    else:
        sr.VerificationFlag, sr.CompletionFlag = "UNVERIFIED", "PARTIAL"
    sr.ContentDate, sr.ContentTime = when[:8], when[8:]
    if replaces is not None:
        ref = Dataset()
        ref.ReferencedSOPClassUID = replaces.SOPClassUID
        ref.ReferencedSOPInstanceUID = replaces.SOPInstanceUID
        series = Dataset()
        series.SeriesInstanceUID = replaces.SeriesInstanceUID
        series.ReferencedSOPSequence = DicomSequence([ref])
        study = Dataset()
        study.StudyInstanceUID = replaces.StudyInstanceUID
        study.ReferencedSeriesSequence = DicomSequence([series])
        sr.PredecessorDocumentsSequence = DicomSequence([study])
    sr.save_as(path, enforce_file_format=True)
    return sr


def poll(puller: ReportPuller, base_url: str) -> int:
    async def main() -> int:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            return await puller.poll_due(DicomWebClient(session, base_url))

    return asyncio.run(main())


def report_state(study_uid: str) -> str:
    return str(Study.get(Study.study_instance_uid == study_uid).report_state)


def row_of(sop_uid: str) -> Report:
    return Report.get(Report.sop_instance_uid == sop_uid)


def retry_of(sop_uid: str) -> ReportRetry | None:
    return ReportRetry.get_or_none(ReportRetry.sop_instance_uid == sop_uid)


@asynccontextmanager
async def cloud_proxy(
    upstream: str, rewrite: dict[str, str] | None = None, lists: str = "pass",
) -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback proxy in front of Orthanc that records requests (path and query).

    ``rewrite`` swaps one path for another; ``lists`` plays a cloud without UID-list
    matching: ``"400"`` refuses a query with a comma-separated UID list, ``"literal"``
    takes the list as one UID and so finds nothing.
    """
    seen: list[str] = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def forward(request: web.Request) -> web.Response:
            seen.append(request.path_qs)
            listed = any("," in v for k, v in request.query.items() if k in ("StudyInstanceUID", "SOPClassUID"))
            if listed and lists == "400":
                return web.json_response({"Message": "UID lists are not supported"}, status=400)
            if listed and lists == "literal":
                return web.Response(status=204)
            path = (rewrite or {}).get(request.path, request.path)
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "content-type")}
            async with session.request(
                request.method, upstream + path, params=request.query, headers=headers, data=await request.read()
            ) as resp:
                body = await resp.read()
                out = {"Content-Type": resp.headers["Content-Type"]} if "Content-Type" in resp.headers else {}
                return web.Response(status=resp.status, body=body, headers=out)

        async with misbehaving_server(forward) as url:
            yield url, seen


def poll_through(puller: ReportPuller, upstream: str, **proxy: Any) -> tuple[list[int], list[str]]:
    """Two polls through a recording proxy: (reports stored by each, requests seen)."""

    async def rounds() -> tuple[list[int], list[str]]:
        async with cloud_proxy(upstream, **proxy) as (url, seen), aiohttp.ClientSession(timeout=TIMEOUT) as s:
            client = DicomWebClient(s, url)
            return [await puller.poll_due(client), await puller.poll_due(client)], list(seen)

    return asyncio.run(rounds())


# ---------------------------------------------------------------------- only verified reports reach the patient


def test_verified_sr_is_current_with_the_reading_doctor_and_its_time(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    sr = reader_sr(data_dir.parent / "sr.dcm", image, "Right lower lobe consolidation.", when="20261124121500")
    publish(orthanc, data_dir.parent / "sr.dcm")
    puller = ReportPuller(data_dir, SETTINGS)

    assert poll(puller, orthanc.dicomweb_url) == 1

    assert report_state(study_uid) == "ready"
    view = current_report(study_uid, data_dir)
    assert view is not None
    assert view.kind == "sr" and view.sop_instance_uid == sr.SOPInstanceUID and view.status == "final"
    assert view.text.splitlines()[0] == "Diagnostic imaging report"
    assert "Finding: Right lower lobe consolidation." in view.text
    assert (view.completion_flag, view.verification_flag) == ("COMPLETE", "VERIFIED")
    assert (view.reading_doctor, view.verified_at) == ("Dlamini Thandi", "20261124121500")
    assert view.reported_at == dt.datetime(2026, 11, 24, 12, 15)
    assert view.pdf_path is None
    assert view.dicom_path.is_absolute() and dcmread(view.dicom_path).SOPInstanceUID == sr.SOPInstanceUID
    assert amendment_of(view) is None and preliminary_report(study_uid, data_dir) is None
    events = list(EventLog.select().where(EventLog.kind == "report_ready"))
    assert [(e.study_instance_uid, e.sop_instance_uid) for e in events] == [(study_uid, sr.SOPInstanceUID)]
    # Still watched (amendments), but what is kept is not fetched again.
    assert poll(puller, orthanc.dicomweb_url) == 0
    assert Report.select().count() == 1


def test_preliminary_sr_is_kept_for_the_console_but_never_current(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    draft = reader_sr(data_dir.parent / "draft.dcm", image, "Query fracture.", verified=False, when="20261124090000")
    publish(orthanc, data_dir.parent / "draft.dcm")
    puller = ReportPuller(data_dir, SETTINGS)

    assert poll(puller, orthanc.dicomweb_url) == 1

    assert report_state(study_uid) == "none"
    assert current_report(study_uid, data_dir) is None
    prelim = preliminary_report(study_uid, data_dir)
    assert prelim is not None and prelim.sop_instance_uid == draft.SOPInstanceUID and prelim.status == "preliminary"
    shown = current_report(study_uid, data_dir, print_preliminary=True)  # [kiosk] print_preliminary = true
    assert shown is not None and shown.status == "preliminary"
    assert EventLog.select().where(EventLog.kind == "report_ready").count() == 0

    final = reader_sr(data_dir.parent / "final.dcm", image, "Fracture of the left radius.", when="20261124160000")
    publish(orthanc, data_dir.parent / "final.dcm")
    assert poll(puller, orthanc.dicomweb_url) == 1

    view = current_report(study_uid, data_dir)
    assert view is not None and view.sop_instance_uid == final.SOPInstanceUID and "left radius" in view.text
    assert report_state(study_uid) == "ready"
    assert preliminary_report(study_uid, data_dir) is None  # the draft is older than the signed report
    assert current_report(study_uid, data_dir, print_preliminary=True) == view
    assert [v.status for v in report_history(study_uid, data_dir)] == ["final", "preliminary"]


def test_encapsulated_pdf_is_final_and_kept_byte_identical(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    report = make_pdf_report(data_dir.parent / "pdf.dcm", image)
    assert len(bytes(report.EncapsulatedDocument)) == len(tiny_pdf()) + 1  # DICOM padded it to even length
    publish(orthanc, data_dir.parent / "pdf.dcm")

    assert poll(ReportPuller(data_dir, SETTINGS), orthanc.dicomweb_url) == 1

    view = current_report(study_uid, data_dir)
    assert view is not None and view.kind == "pdf" and view.status == "final" and view.pdf_path is not None
    assert view.pdf_path.is_absolute()
    assert view.pdf_path.read_bytes() == tiny_pdf()
    assert view.text == ""
    assert report_state(study_uid) == "ready"
    assert sorted(p.name for p in view.pdf_path.parent.iterdir()) == sorted(
        [f"{report.SOPInstanceUID}.dcm", f"{report.SOPInstanceUID}.pdf"]
    )  # no temp files left behind


def test_radiation_dose_sr_from_the_dr_is_not_a_report(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    make_text_sr(data_dir.parent / "dose.dcm", image, text="DAP 1.2 Gy.cm2", sop_class=DOSE_SR)
    publish(orthanc, data_dir.parent / "dose.dcm")

    assert poll(ReportPuller(data_dir, SETTINGS), orthanc.dicomweb_url) == 0

    assert report_state(study_uid) == "none"
    assert Report.select().count() == 0 and ReportRetry.select().count() == 0
    assert current_report(study_uid, data_dir) is None


# ---------------------------------------------------------------------- amendments


def test_amended_sr_naming_its_predecessor_supersedes_the_earlier(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    first = reader_sr(data_dir.parent / "a.dcm", image, "No fracture.", when="20261124120000")
    publish(orthanc, data_dir.parent / "a.dcm")
    puller = ReportPuller(data_dir, SETTINGS)
    assert poll(puller, orthanc.dicomweb_url) == 1
    # The amendment names the first; its own date-time is even earlier (a clock off on the reader's side).
    amended = reader_sr(data_dir.parent / "b.dcm", image, "Hairline fracture of the distal radius.",
                        when="20261124115900", doctor="Naidoo^Priya", replaces=first)
    publish(orthanc, data_dir.parent / "b.dcm")

    assert poll(puller, orthanc.dicomweb_url) == 1

    view = current_report(study_uid, data_dir)
    assert view is not None and view.sop_instance_uid == amended.SOPInstanceUID
    assert view.status == "amended" and view.reading_doctor == "Naidoo Priya"
    assert amendment_of(view) == dt.datetime(2026, 11, 24, 12, 0)
    assert row_of(first.SOPInstanceUID).superseded_by == amended.SOPInstanceUID
    assert not amended_after_printing(study_uid) and not row_of(first.SOPInstanceUID).amended_after_printing
    assert report_state(study_uid) == "ready"
    assert [v.sop_instance_uid for v in report_history(study_uid, data_dir)] == [
        first.SOPInstanceUID, amended.SOPInstanceUID,  # by the reader's date-time, newest first
    ]
    (event,) = EventLog.select().where(EventLog.kind == "report_amended")
    assert (event.study_instance_uid, event.sop_instance_uid) == (study_uid, amended.SOPInstanceUID)


def test_report_amended_after_printing_is_flagged_and_audited(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    first = reader_sr(data_dir.parent / "a.dcm", image, "Normal chest.", when="20261124120000")
    publish(orthanc, data_dir.parent / "a.dcm")
    puller = ReportPuller(data_dir, SETTINGS)
    assert poll(puller, orthanc.dicomweb_url) == 1
    with write_transaction():  # the kiosk printed it, as kiosk.tickets records a print
        audit = KioskAudit.create(action="print", outcome="printing", report_sop_uid=first.SOPInstanceUID)
    finish_print(int(audit.id), "printed", job="kiosk-7", study_uid=study_uid)
    assert report_state(study_uid) == "printed"
    later = reader_sr(data_dir.parent / "b.dcm", image, "Small left pleural effusion.", when="20261124170000")
    publish(orthanc, data_dir.parent / "b.dcm")

    assert poll(puller, orthanc.dicomweb_url) == 1

    view = current_report(study_uid, data_dir)
    assert view is not None and view.sop_instance_uid == later.SOPInstanceUID and view.status == "amended"
    assert amended_after_printing(study_uid)
    assert row_of(first.SOPInstanceUID).amended_after_printing
    assert row_of(first.SOPInstanceUID).superseded_by == later.SOPInstanceUID
    assert report_state(study_uid) == "ready"  # the amended report is waiting to be printed
    assert EventLog.select().where(
        (EventLog.kind == "report_amended_after_printing") & (EventLog.study_instance_uid == study_uid)
    ).count() == 1


def test_two_final_reports_at_once_only_the_newest_is_current(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    newer = reader_sr(data_dir.parent / "n.dcm", image, "Final: fracture of the left radius.", when="20261124160000")
    older = reader_sr(data_dir.parent / "o.dcm", image, "Final: no fracture.", when="20261124090000")
    for name in ("n.dcm", "o.dcm"):
        publish(orthanc, data_dir.parent / name)

    assert poll(ReportPuller(data_dir, SETTINGS), orthanc.dicomweb_url) == 2

    view = current_report(study_uid, data_dir)
    assert view is not None and view.sop_instance_uid == newer.SOPInstanceUID
    assert row_of(older.SOPInstanceUID).superseded_by == newer.SOPInstanceUID
    assert [v.superseded_by for v in report_history(study_uid, data_dir)] == ["", newer.SOPInstanceUID]
    assert EventLog.select().where(EventLog.kind == "report_ready").count() == 1


# ---------------------------------------------------------------------- the wrong report, and broken ones


def test_report_of_another_study_is_refused(
    orthanc: OrthancPeer, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine = receive(data_dir, orthanc)
    my_uid = str(mine.StudyInstanceUID)
    my_sr = reader_sr(data_dir.parent / "mine.dcm", mine, "Normal chest.")
    publish(orthanc, data_dir.parent / "mine.dcm")
    other = make_dx(data_dir.parent / "other-dx.dcm", rows=16, cols=16)  # another patient, only in the cloud
    other_sr = reader_sr(data_dir.parent / "other.dcm", other, "Mass in the left upper lobe.")
    publish(orthanc, data_dir.parent / "other.dcm")
    wado = "/dicom-web/studies/{0.StudyInstanceUID}/series/{0.SeriesInstanceUID}/instances/{0.SOPInstanceUID}"
    # The cloud answers WADO-RS for my report with the other study's report.
    swap = {wado.format(my_sr): wado.format(other_sr)}
    puller = ReportPuller(data_dir, SETTINGS)

    with caplog.at_level(logging.ERROR, logger="sync.reports"):
        counts, seen = poll_through(puller, orthanc.base_url, rewrite=swap)

    assert counts == [0, 0]
    assert sum(1 for p in seen if p.startswith(wado.format(my_sr))) == 1  # not fetched again at the next poll
    assert report_state(my_uid) == "none"
    assert Report.select().count() == 0 and current_report(my_uid, data_dir) is None
    assert not any(puller.root.rglob("*.dcm"))  # the other patient's file is not kept
    retry = retry_of(my_sr.SOPInstanceUID)
    assert retry is not None
    assert retry.reason == f"report {my_sr.SOPInstanceUID} refused: it belongs to study {other.StudyInstanceUID}"
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert refused and my_uid in refused[0].getMessage() and str(other.StudyInstanceUID) in refused[0].getMessage()
    assert "TEST^PATIENT" not in caplog.text
    assert EventLog.select().where(EventLog.kind == "report_refused").count() == 1


def test_encapsulated_document_that_is_not_a_pdf_is_refused_with_a_clear_line(
    orthanc: OrthancPeer, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    path = data_dir.parent / "bad.dcm"
    bad = make_pdf_report(path, image)
    bad.EncapsulatedDocument = b"<html>not a pdf</html>"
    bad.save_as(path, enforce_file_format=True)
    publish(orthanc, path)
    started = utcnow()

    with caplog.at_level(logging.ERROR, logger="sync.reports"):
        assert poll(ReportPuller(data_dir, SETTINGS), orthanc.dicomweb_url) == 0

    assert report_state(study_uid) == "none" and current_report(study_uid, data_dir) is None
    (line,) = [r.getMessage() for r in caplog.records if bad.SOPInstanceUID in r.getMessage()]
    assert study_uid in line and "not shown: encapsulated document is not a PDF (no %PDF header)" in line
    assert (data_dir / "reports" / study_uid / f"{bad.SOPInstanceUID}.dcm").exists()  # kept for inspection
    assert not (data_dir / "reports" / study_uid / f"{bad.SOPInstanceUID}.pdf").exists()
    retry = retry_of(bad.SOPInstanceUID)
    assert retry is not None and "not a PDF" in retry.reason
    assert retry.next_try_at >= started + dt.timedelta(seconds=SETTINGS.max_backoff_s)


def _nested(depth: int) -> Dataset:
    leaf = Dataset()
    leaf.RelationshipType, leaf.ValueType, leaf.TextValue = "CONTAINS", "TEXT", "Deep."
    for _ in range(depth):
        box = Dataset()
        box.RelationshipType, box.ValueType = "CONTAINS", "CONTAINER"
        box.ContentSequence = DicomSequence([leaf])
        leaf = box
    return leaf


def test_sr_content_tree_huge_deep_or_malformed_is_not_shown(
    orthanc: OrthancPeer, data_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reports, "MAX_REPORT_ELEMENTS", 3000)  # "huge" at a size quick to build
    cases: dict[str, tuple[str, str]] = {}
    for name in ("huge", "deep", "malformed"):
        image = receive(data_dir, orthanc)
        path = data_dir.parent / f"{name}.dcm"
        sr = reader_sr(path, image, f"A {name} report.")
        if name == "huge":
            sr.ContentSequence = DicomSequence([_nested(0) for _ in range(2000)])
        elif name == "deep":
            sr.ContentSequence = DicomSequence([_nested(40)])
        else:  # items with no value type and no value: nothing a patient could read
            empty = Dataset()
            empty.RelationshipType = "CONTAINS"
            sr.ContentSequence = DicomSequence([empty, empty])
            del sr.ConceptNameCodeSequence
        sr.save_as(path, enforce_file_format=True)
        publish(orthanc, path)
        cases[name] = (str(image.StudyInstanceUID), str(sr.SOPInstanceUID))

    with caplog.at_level(logging.ERROR, logger="sync.reports"):
        assert poll(ReportPuller(data_dir, SETTINGS), orthanc.dicomweb_url) == 0

    expected = {"huge": "elements", "deep": "nested deeper than 32 levels", "malformed": "SR holds no readable text"}
    for name, (study_uid, sop_uid) in cases.items():
        assert current_report(study_uid, data_dir) is None and report_state(study_uid) == "none"
        (line,) = [r.getMessage() for r in caplog.records if sop_uid in r.getMessage()]
        assert study_uid in line and "not shown" in line and expected[name] in line, line
        retry = retry_of(sop_uid)
        assert retry is not None and expected[name] in retry.reason
    assert Report.select().count() == 0


# ---------------------------------------------------------------------- one query for all, and clouds that cannot


def test_one_poll_of_50_waiting_studies_makes_one_query_per_url_sized_list(
    orthanc: OrthancPeer, data_dir: Path
) -> None:
    uids = [str(receive(data_dir, orthanc).StudyInstanceUID) for _ in range(50)]
    reported = make_dx(data_dir.parent / "x.dcm", rows=16, cols=16, study_uid=uids[37])
    sr = reader_sr(data_dir.parent / "sr37.dcm", reported, "Cardiomegaly.")
    publish(orthanc, data_dir.parent / "sr37.dcm")
    settings = ReportSettings(max_url_chars=1500)
    puller = ReportPuller(data_dir, settings)
    watched = [w.study_instance_uid for w in puller.watched_studies()]
    expected = len(split_uid_list(watched, settings.max_url_chars))
    assert sorted(watched) == sorted(uids) and expected == math.ceil(sum(len(u) + 1 for u in uids) / 1500)

    with FaultProxy(orthanc.base_url) as proxy:
        assert poll(puller, proxy.url + "/dicom-web") == 1  # the first poll also asks once whether lists work
        assert puller.uid_lists is True
        proxy.clear()
        assert poll(puller, proxy.url + "/dicom-web") == 0
        queries = [r for r in proxy.requests if r.method == "GET"]

    assert 1 < len(queries) == expected
    asked: list[str] = []
    for record in queries:
        assert urlsplit(record.path).path == "/dicom-web/instances"
        listed = parse_qs(urlsplit(record.path).query)["StudyInstanceUID"][0]
        assert len(listed) <= settings.max_url_chars
        asked += listed.split(",")
    assert sorted(asked) == sorted(uids)  # every waiting study, each once
    view = current_report(uids[37], data_dir)
    assert view is not None and view.sop_instance_uid == sr.SOPInstanceUID


@pytest.mark.parametrize("refusal", ["400", "literal"])
def test_cloud_without_uid_list_matching_is_detected_once_and_polled_per_study(
    orthanc: OrthancPeer, data_dir: Path, caplog: pytest.LogCaptureFixture, refusal: str
) -> None:
    images = [receive(data_dir, orthanc) for _ in range(3)]
    sr = reader_sr(data_dir.parent / "sr.dcm", images[1], "Normal chest.")
    publish(orthanc, data_dir.parent / "sr.dcm")
    puller = ReportPuller(data_dir, SETTINGS)

    with caplog.at_level(logging.INFO, logger="sync.reports"):
        counts, seen = poll_through(puller, orthanc.base_url, lists=refusal)

    assert counts == [1, 0] and puller.uid_lists is False
    lines = [r for r in caplog.records if "does not do UID-list matching" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    view = current_report(str(images[1].StudyInstanceUID), data_dir)
    assert view is not None and view.sop_instance_uid == sr.SOPInstanceUID
    assert sum(1 for p in seen if "/studies/" in p and "/instances?" in p) == 9  # 3 narrow queries x 3 studies, once
    for image in images:  # each study now backs off on its own
        row = ReportPoll.get(ReportPoll.study == Study.get(Study.study_instance_uid == image.StudyInstanceUID).id)
        assert row.next_poll_at > utcnow() + dt.timedelta(seconds=SETTINGS.min_backoff_s / 2)
    assert sum(1 for p in seen if urlsplit(p).path == "/dicom-web/studies") == 1  # asked once whether lists work


def test_cloud_500_or_hanging_is_tried_again_at_the_next_poll_and_nothing_is_lost(
    orthanc: OrthancPeer, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    sr = reader_sr(data_dir.parent / "sr.dcm", image, "Normal chest.")
    publish(orthanc, data_dir.parent / "sr.dcm")
    puller = ReportPuller(data_dir, ReportSettings(query_timeout_s=1.0))

    with FaultProxy(orthanc.base_url) as proxy, caplog.at_level(logging.INFO, logger="sync.reports"):
        url = proxy.url + "/dicom-web"
        proxy.set_mode("status", status=500)
        assert poll(puller, url) == 0
        proxy.set_mode("hang", seconds=30)
        assert poll(puller, url) == 0  # given up after [reports] query_timeout_s, not the session's 15 s
        assert current_report(study_uid, data_dir) is None and report_state(study_uid) == "none"
        proxy.set_mode("pass")
        assert poll(puller, url) == 1

    view = current_report(study_uid, data_dir)
    assert view is not None and view.sop_instance_uid == sr.SOPInstanceUID
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "HTTP 500" in warnings[0]  # one line while the cloud keeps failing
    assert any("the cloud answers again" in r.getMessage() for r in caplog.records)


def test_check_now_puts_a_backing_off_study_in_the_next_poll(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    puller = ReportPuller(data_dir, SETTINGS)
    puller.uid_lists = False  # a cloud polled study by study: this one waits a minute or more between asks
    assert poll(puller, orthanc.dicomweb_url) == 0
    reader_sr(data_dir.parent / "sr.dcm", image, "Normal chest.")
    publish(orthanc, data_dir.parent / "sr.dcm")
    assert poll(puller, orthanc.dicomweb_url) == 0  # backing off: not asked

    assert check_now(study_uid, data_dir) and check_requested()
    assert poll(puller, orthanc.dicomweb_url) == 1

    assert current_report(study_uid, data_dir) is not None and not check_requested()
    assert not check_now("1.2.3.999", data_dir)  # an unknown study: nothing to do
    assert EventLog.select().where(EventLog.kind == "report_check_requested").count() == 1


# ---------------------------------------------------------------------- which studies are watched


def test_study_not_fully_synced_is_not_polled(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    receive(data_dir, None, synced=False, study_uid=study_uid)  # a second image still in the outbox
    reader_sr(data_dir.parent / "sr.dcm", image, "Normal chest.")
    publish(orthanc, data_dir.parent / "sr.dcm")
    puller = ReportPuller(data_dir, SETTINGS)

    counts, seen = poll_through(puller, orthanc.base_url)

    assert (counts, seen) == ([0, 0], [])
    mark_synced(study_uid)
    assert poll(puller, orthanc.dicomweb_url) == 1
    assert report_state(study_uid) == "ready"


def test_every_recent_study_is_watched_whatever_its_report_state(data_dir: Path) -> None:
    uids = [str(receive(data_dir, None).StudyInstanceUID) for _ in range(4)]
    now = utcnow()
    ages = {uids[0]: 2, uids[1]: 30, uids[2]: 5, uids[3]: 1}  # days; 30 is past the lookback
    for uid, days in ages.items():
        Study.update(received_at=now - dt.timedelta(days=days)).where(Study.study_instance_uid == uid).execute()
    Study.update(report_state="printed").where(Study.study_instance_uid == uids[3]).execute()
    Study.update(report_state="ready").where(Study.study_instance_uid == uids[0]).execute()
    puller = ReportPuller(data_dir, ReportSettings(lookback_days=14))

    assert [s.study_instance_uid for s in puller.watched_studies()] == [uids[3], uids[0], uids[2]]
    check_now(uids[2])
    assert next(s.study_instance_uid for s in puller.watched_studies()) == uids[2]  # asked-for first


def test_upgrade_takes_back_ready_from_a_study_whose_only_report_is_unverified(data_dir: Path) -> None:
    uid = str(receive(data_dir, None).StudyInstanceUID)
    study = Study.get(Study.study_instance_uid == uid)
    Report.create(study=study, sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11", kind="sr",
                  text="Draft.", dicom_path=f"{uid}/1.2.3.4.dcm", verification_flag="UNVERIFIED",
                  completion_flag="PARTIAL", content_datetime="20261124101500")
    Study.update(report_state="ready").where(Study.id == study.id).execute()  # as version 1 of the puller did

    MIGRATIONS[1](database)  # the step is additive and safe to run on a node that has its columns

    assert report_state(uid) == "none"
    assert row_of("1.2.3.4").reported_at == "20261124101500"


# ---------------------------------------------------------------------- pure parts


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "99TEST", meaning
    return item


def _item(value_type: str, name: str | None, **attrs: object) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    if name:
        item.ConceptNameCodeSequence = DicomSequence([_code("n", name)])
    for key, value in attrs.items():
        setattr(item, key, value)
    return item


def test_sr_content_tree_reads_as_indented_plain_text() -> None:
    measured = Dataset()
    measured.NumericValue = "14.5"
    measured.MeasurementUnitsCodeSequence = DicomSequence([_code("mm", "millimeter")])
    image_ref = _item("IMAGE", "Key image")
    findings = _item(
        "CONTAINER", "Findings",
        ContentSequence=DicomSequence([
            _item("TEXT", "Finding", TextValue="Nodule in the right upper lobe.\r\nNo effusion.\r\n"),
            _item("NUM", "Diameter", MeasuredValueSequence=DicomSequence([measured])),
            image_ref,
        ]),
    )
    impression = _item(
        "CONTAINER", "Impression",
        ContentSequence=DicomSequence([
            _item("CODE", "Conclusion", ConceptCodeSequence=DicomSequence([_code("c", "Pulmonary nodule")])),
            _item("TEXT", None, TextValue="Follow-up CT in 3 months."),
        ]),
    )
    root = Dataset()
    root.ValueType = "CONTAINER"
    root.ConceptNameCodeSequence = DicomSequence([_code("18748-4", "Diagnostic imaging report")])
    root.ContentSequence = DicomSequence([findings, impression])

    assert sr_text(root) == "\n".join([
        "Diagnostic imaging report",
        "Findings",
        "  Finding:",
        "    Nodule in the right upper lobe.",
        "    No effusion.",
        "  Diameter: 14.5 millimeter",
        "Impression",
        "  Conclusion: Pulmonary nodule",
        "  Follow-up CT in 3 months.",
    ])


def test_uid_lists_are_cut_to_the_url_budget_in_order() -> None:
    uids = [f"1.2.{n:04d}" for n in range(10)]  # 8 characters each

    assert split_uid_list(uids, 26) == [uids[0:3], uids[3:6], uids[6:9], uids[9:]]  # 3 x 8 + 2 commas = 26
    assert split_uid_list(uids, 10_000) == [uids]
    assert split_uid_list(["1.2.3.4.5.6"], 4) == [["1.2.3.4.5.6"]]
    assert split_uid_list([], 100) == []


def test_backoff_grows_with_jitter_and_stays_under_the_cap() -> None:
    delays = [backoff_delay(n, SETTINGS) for n in range(1, 12)]

    for n, delay in enumerate(delays, start=1):
        assert min(60 * 2 ** (n - 1), 3600) <= delay <= min(60 * 2 ** (n - 1) + 30, 3600)
    assert delays[-1] == 3600
    assert len({backoff_delay(1, SETTINGS) for _ in range(20)}) > 1  # jittered
