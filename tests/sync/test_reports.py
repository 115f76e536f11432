"""The report puller against a real Orthanc: the reader's report comes back, and only the right one."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from edge.store.db import database, open_database
from edge.store.models import EventLog, Instance, Outbox, Study, utcnow
from edge.store.spool import Spool, keep_instance
from sync.dicomweb import DicomWebClient
from sync.reports import ReportPuller, ReportSettings, backoff_delay, report_for_study, sr_text
from sync.tables import Report, ReportPoll
from tests.dicom_factory import make_dx
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


def poll(puller: ReportPuller, base_url: str) -> int:
    async def main() -> int:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            return await puller.poll_due(DicomWebClient(session, base_url))

    return asyncio.run(main())


def report_state(study_uid: str) -> str:
    return str(Study.get(Study.study_instance_uid == study_uid).report_state)


def poll_row(study_uid: str) -> ReportPoll | None:
    return ReportPoll.select().join(Study).where(Study.study_instance_uid == study_uid).first()


def make_due_now(study_uid: str) -> None:
    study = Study.get(Study.study_instance_uid == study_uid)
    ReportPoll.update(next_poll_at=utcnow() - dt.timedelta(seconds=1)).where(ReportPoll.study == study.id).execute()


@asynccontextmanager
async def cloud_proxy(
    upstream: str, rewrite: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback proxy in front of Orthanc that records request paths and can swap one path for another."""
    seen: list[str] = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def forward(request: web.Request) -> web.Response:
            seen.append(request.path)
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


# ---------------------------------------------------------------------- reports come back


def test_sr_report_in_the_cloud_makes_the_study_ready_with_the_readers_text(
    orthanc: OrthancPeer, data_dir: Path
) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    sr = make_text_sr(data_dir.parent / "sr.dcm", image, text="Right lower lobe consolidation.")
    publish(orthanc, data_dir.parent / "sr.dcm")
    puller = ReportPuller(data_dir, SETTINGS)

    assert poll(puller, orthanc.dicomweb_url) == 1

    assert report_state(study_uid) == "ready"
    view = report_for_study(study_uid, data_dir)
    assert view is not None
    assert view.kind == "sr" and view.sop_instance_uid == sr.SOPInstanceUID
    assert view.text.splitlines()[0] == "Diagnostic imaging report"
    assert "Finding: Right lower lobe consolidation." in view.text
    assert (view.completion_flag, view.verification_flag) == ("COMPLETE", "UNVERIFIED")
    assert view.content_datetime == "20261124101500"
    assert view.pdf_path is None
    assert view.dicom_path.is_absolute() and dcmread(view.dicom_path).SOPInstanceUID == sr.SOPInstanceUID
    assert poll_row(study_uid) is None
    events = list(EventLog.select().where(EventLog.kind == "report_ready"))
    assert [(e.study_instance_uid, e.sop_instance_uid) for e in events] == [(study_uid, "")]
    # Ready studies are not asked about again.
    assert poll(puller, orthanc.dicomweb_url) == 0
    assert Report.select().count() == 1


def test_encapsulated_pdf_report_is_kept_byte_identical(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    report = make_pdf_report(data_dir.parent / "pdf.dcm", image)
    assert len(bytes(report.EncapsulatedDocument)) == len(tiny_pdf()) + 1  # DICOM padded it to even length
    publish(orthanc, data_dir.parent / "pdf.dcm")

    assert poll(ReportPuller(data_dir, SETTINGS), orthanc.dicomweb_url) == 1

    view = report_for_study(study_uid, data_dir)
    assert view is not None and view.kind == "pdf" and view.pdf_path is not None
    assert view.pdf_path.is_absolute()
    assert view.pdf_path.read_bytes() == tiny_pdf()
    assert view.pdf_path.read_bytes().startswith(b"%PDF")
    assert view.text == ""
    assert report_state(study_uid) == "ready"
    assert sorted(p.name for p in view.pdf_path.parent.iterdir()) == sorted(
        [f"{report.SOPInstanceUID}.dcm", f"{report.SOPInstanceUID}.pdf"]
    )  # no temp files left behind


def test_unread_study_backs_off_and_its_report_is_pulled_once_due(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    puller = ReportPuller(data_dir, SETTINGS)

    async def rounds() -> tuple[list[int], list[str], int]:
        async with cloud_proxy(orthanc.base_url) as (url, seen), aiohttp.ClientSession(timeout=TIMEOUT) as s:
            client = DicomWebClient(s, url)
            first = await puller.poll_due(client)
            after_first = len(seen)
            second = await puller.poll_due(client)
            return [first, second], list(seen), after_first

    started = utcnow()
    counts, seen, after_first = asyncio.run(rounds())

    assert counts == [0, 0]
    assert after_first == 3 and all("/instances" in p for p in seen)  # the three QIDO-RS report queries
    assert len(seen) == after_first  # the second round asked nothing: the study is backing off
    row = poll_row(study_uid)
    assert row is not None and row.attempts == 1 and row.last_error == ""
    assert row.next_poll_at >= started + dt.timedelta(seconds=SETTINGS.min_backoff_s)
    assert report_state(study_uid) == "none"

    make_text_sr(data_dir.parent / "sr.dcm", image)
    publish(orthanc, data_dir.parent / "sr.dcm")
    assert poll(puller, orthanc.dicomweb_url) == 0  # not due yet
    refreshed = poll_row(study_uid)
    assert refreshed is not None and refreshed.attempts == 1

    make_due_now(study_uid)
    assert poll(puller, orthanc.dicomweb_url) == 1
    assert report_state(study_uid) == "ready"
    assert poll_row(study_uid) is None


def test_radiation_dose_sr_from_the_dr_is_not_a_report(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    make_text_sr(data_dir.parent / "dose.dcm", image, text="DAP 1.2 Gy.cm2", sop_class=DOSE_SR)
    publish(orthanc, data_dir.parent / "dose.dcm")

    assert poll(ReportPuller(data_dir, SETTINGS), orthanc.dicomweb_url) == 0

    assert report_state(study_uid) == "none"
    assert Report.select().count() == 0
    assert report_for_study(study_uid, data_dir) is None
    row = poll_row(study_uid)
    assert row is not None and row.attempts == 1 and row.last_error == ""


def test_study_not_fully_synced_is_not_polled(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    receive(data_dir, None, synced=False, study_uid=study_uid)  # a second image still in the outbox
    make_text_sr(data_dir.parent / "sr.dcm", image)
    publish(orthanc, data_dir.parent / "sr.dcm")
    puller = ReportPuller(data_dir, SETTINGS)

    async def one_round() -> tuple[int, list[str]]:
        async with cloud_proxy(orthanc.base_url) as (url, seen), aiohttp.ClientSession(timeout=TIMEOUT) as s:
            return await puller.poll_due(DicomWebClient(s, url)), list(seen)

    stored, seen = asyncio.run(one_round())

    assert (stored, seen) == (0, [])
    assert report_state(study_uid) == "none" and poll_row(study_uid) is None

    mark_synced(study_uid)
    assert poll(puller, orthanc.dicomweb_url) == 1
    assert report_state(study_uid) == "ready"


def test_round_takes_oldest_due_recent_studies_first_up_to_its_limit(data_dir: Path) -> None:
    uids = [str(receive(data_dir, None).StudyInstanceUID) for _ in range(4)]
    now = utcnow()
    ages = {uids[0]: 2, uids[1]: 30, uids[2]: 5, uids[3]: 1}  # days; 30 is past the lookback
    for uid, days in ages.items():
        Study.update(received_at=now - dt.timedelta(days=days)).where(Study.study_instance_uid == uid).execute()
    Study.update(report_state="printed").where(Study.study_instance_uid == uids[3]).execute()
    puller = ReportPuller(data_dir, ReportSettings(lookback_days=14, max_studies_per_round=2))

    assert [s.study_instance_uid for s in puller.due_studies()] == [uids[2], uids[0]]
    assert [s.study_instance_uid for s in ReportPuller(data_dir).due_studies()] == [uids[2], uids[0]]


# ---------------------------------------------------------------------- the wrong report, and broken ones


def test_report_of_another_study_is_refused(
    orthanc: OrthancPeer, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine = receive(data_dir, orthanc)
    my_uid = str(mine.StudyInstanceUID)
    my_sr = make_text_sr(data_dir.parent / "mine.dcm", mine, text="Normal chest.")
    publish(orthanc, data_dir.parent / "mine.dcm")
    other = make_dx(data_dir.parent / "other-dx.dcm", rows=16, cols=16)  # another patient, only in the cloud
    other_sr = make_text_sr(data_dir.parent / "other.dcm", other, text="Mass in the left upper lobe.")
    publish(orthanc, data_dir.parent / "other.dcm")
    wado = "/dicom-web/studies/{0.StudyInstanceUID}/series/{0.SeriesInstanceUID}/instances/{0.SOPInstanceUID}"
    # The cloud answers WADO-RS for my report with the other study's report.
    swap = {wado.format(my_sr): wado.format(other_sr)}
    puller = ReportPuller(data_dir, SETTINGS)

    async def one_round() -> int:
        async with cloud_proxy(orthanc.base_url, swap) as (url, _), aiohttp.ClientSession(timeout=TIMEOUT) as s:
            return await puller.poll_due(DicomWebClient(s, url))

    with caplog.at_level(logging.ERROR, logger="sync.reports"):
        assert asyncio.run(one_round()) == 0

    assert report_state(my_uid) == "none"
    assert Report.select().count() == 0 and report_for_study(my_uid, data_dir) is None
    assert not any(puller.root.rglob("*.dcm"))  # the other patient's file is not kept
    row = poll_row(my_uid)
    assert row is not None
    assert row.last_error == f"report {my_sr.SOPInstanceUID} refused: it belongs to study {other.StudyInstanceUID}"
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert refused and my_uid in refused[0].getMessage() and str(other.StudyInstanceUID) in refused[0].getMessage()
    assert "TEST^PATIENT" not in caplog.text
    assert EventLog.select().where(EventLog.kind == "report_refused").count() == 1


def test_encapsulated_document_that_is_not_a_pdf_is_kept_but_not_shown(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    path = data_dir.parent / "bad.dcm"
    bad = make_pdf_report(path, image)
    bad.EncapsulatedDocument = b"<html>not a pdf</html>"
    bad.save_as(path, enforce_file_format=True)
    publish(orthanc, path)
    started = utcnow()

    assert poll(ReportPuller(data_dir, SETTINGS), orthanc.dicomweb_url) == 0

    assert report_state(study_uid) == "none"
    assert (data_dir / "reports" / study_uid / f"{bad.SOPInstanceUID}.dcm").exists()  # kept for inspection
    assert not (data_dir / "reports" / study_uid / f"{bad.SOPInstanceUID}.pdf").exists()
    row = poll_row(study_uid)
    assert row is not None and "not a PDF" in row.last_error
    assert row.next_poll_at >= started + dt.timedelta(seconds=SETTINGS.max_backoff_s)


def test_newest_report_is_the_one_shown(orthanc: OrthancPeer, data_dir: Path) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    for name, text, time in (("final.dcm", "Final: fracture of the left radius.", "160000"),
                             ("prelim.dcm", "Preliminary: query fracture.", "090000")):
        report = make_text_sr(data_dir.parent / name, image, text=text)
        report.ContentTime = time
        report.save_as(data_dir.parent / name, enforce_file_format=True)
        publish(orthanc, data_dir.parent / name)

    assert poll(ReportPuller(data_dir, SETTINGS), orthanc.dicomweb_url) == 2

    view = report_for_study(study_uid, data_dir)
    assert view is not None and "Final: fracture of the left radius." in view.text
    assert EventLog.select().where(EventLog.kind == "report_ready").count() == 1


# ---------------------------------------------------------------------- the cloud misbehaves


def test_cloud_down_is_recorded_and_the_report_is_pulled_once_it_is_back(orthanc: OrthancPeer, data_dir: Path) -> None:
    images = [receive(data_dir, orthanc) for _ in range(2)]
    uids = [str(i.StudyInstanceUID) for i in images]
    for n, image in enumerate(images):
        make_text_sr(data_dir.parent / f"sr{n}.dcm", image)
        publish(orthanc, data_dir.parent / f"sr{n}.dcm")
    puller = ReportPuller(data_dir, SETTINGS)
    orthanc.stop()

    assert poll(puller, orthanc.dicomweb_url) == 0

    first, second = (poll_row(u) for u in uids)
    assert first is not None and "could not connect" in first.last_error and first.attempts == 1
    assert second is None  # the link was down: the round ended rather than fail every study
    assert [report_state(u) for u in uids] == ["none", "none"]

    orthanc.start()
    make_due_now(uids[0])
    assert poll(puller, orthanc.dicomweb_url) == 2
    assert [report_state(u) for u in uids] == ["ready", "ready"]


def test_permanent_cloud_error_backs_off_at_the_maximum_and_the_round_goes_on(
    orthanc: OrthancPeer, data_dir: Path
) -> None:
    uids = [str(receive(data_dir, orthanc).StudyInstanceUID) for _ in range(2)]
    started = utcnow()

    assert poll(ReportPuller(data_dir, SETTINGS), orthanc.base_url + "/no-such-dicom-web") == 0

    for uid in uids:
        row = poll_row(uid)
        assert row is not None and "HTTP 404" in row.last_error
        assert row.next_poll_at >= started + dt.timedelta(seconds=SETTINGS.max_backoff_s)
        assert report_state(uid) == "none"


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


def test_backoff_grows_with_jitter_and_stays_under_the_cap() -> None:
    delays = [backoff_delay(n, SETTINGS) for n in range(1, 12)]

    for n, delay in enumerate(delays, start=1):
        assert min(60 * 2 ** (n - 1), 3600) <= delay <= min(60 * 2 ** (n - 1) + 30, 3600)
    assert delays[-1] == 3600
    assert len({backoff_delay(1, SETTINGS) for _ in range(20)}) > 1  # jittered
