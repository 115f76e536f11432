"""The DICOMweb client against a real Orthanc (and small misbehaving servers for the faults)."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from sync.dicomweb import (
    BASIC_TEXT_SR,
    ENCAPSULATED_PDF,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    DicomWebClient,
    DicomWebError,
    StowResult,
    json_value,
)
from tests.dicom_factory import make_dx, tiny_pdf
from tests.peers.orthanc import OrthancPeer

T = TypeVar("T")
TIMEOUT = aiohttp.ClientTimeout(total=15, connect=3)
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR: a DR's own, not a report




def run(make: Callable[[DicomWebClient], Awaitable[T]], base_url: str, timeout: aiohttp.ClientTimeout = TIMEOUT) -> T:
    """Run one coroutine with a fresh session and client, as the outbox worker would."""

    async def main() -> T:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await make(DicomWebClient(session, base_url))

    return asyncio.run(main())


def sample_file(name: str, dest: Path) -> Path:
    path = Path(str(get_testdata_file(name)))
    return Path(shutil.copy(path, dest / name))


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _document(path: Path, sop_class: str, modality: str, study: Dataset, **attrs: Any) -> Dataset:
    """A Part 10 file in the same study and patient as ``study`` (a reader's output)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = study.PatientName
    ds.PatientID = study.PatientID
    ds.AccessionNumber = study.AccessionNumber
    ds.StudyDate = study.StudyDate
    ds.Modality = modality
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ContentDate = "20261124"
    ds.ContentTime = "101500"
    for key, value in attrs.items():
        setattr(ds, key, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def make_text_sr(path: Path, study: Dataset, text: str = "No acute cardiopulmonary findings.",
                 sop_class: str = BASIC_TEXT_SR) -> Dataset:
    """A Basic Text SR with one TEXT finding: the reader's report."""
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.ConceptNameCodeSequence = DicomSequence([_code("121071", "DCM", "Finding")])
    finding.TextValue = text
    return _document(
        path, sop_class, "SR", study,
        ValueType="CONTAINER",
        ContinuityOfContent="SEPARATE",
        ConceptNameCodeSequence=DicomSequence([_code("18748-4", "LN", "Diagnostic imaging report")]),
        CompletionFlag="COMPLETE",
        VerificationFlag="UNVERIFIED",
        ContentSequence=DicomSequence([finding]),
    )


def make_pdf_report(path: Path, study: Dataset) -> Dataset:
    """An Encapsulated PDF report in ``study``."""
    pdf = tiny_pdf()
    return _document(
        path, ENCAPSULATED_PDF, "DOC", study,
        MIMETypeOfEncapsulatedDocument="application/pdf",
        EncapsulatedDocument=pdf + (b"\0" if len(pdf) % 2 else b""),
        DocumentTitle="Radiology report",
        BurnedInAnnotation="YES",
        ConceptNameCodeSequence=DicomSequence([_code("18748-4", "LN", "Diagnostic imaging report")]),
    )


@asynccontextmanager
async def misbehaving_server(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """A loopback HTTP server answering every request with ``handler``; yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/dicom-web"
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- STOW-RS against Orthanc


def test_three_instances_uploaded_are_exactly_the_ones_stored(orthanc: OrthancPeer, tmp_path: Path) -> None:
    files = [sample_file("CT_small.dcm", tmp_path), sample_file("MR_small.dcm", tmp_path)]
    make_dx(tmp_path / "dx.dcm", rows=64, cols=64)
    files.append(tmp_path / "dx.dcm")

    result = run(lambda c: c.stow(files), orthanc.dicomweb_url)

    assert result.stored == {uid_of(f) for f in files}
    assert result.failed == {}
    assert result.http_status == 200
    assert result.bytes_sent > sum(f.stat().st_size for f in files)
    assert orthanc.instance_count() == 3
    assert sorted(orthanc.sop_instance_uids()) == sorted(uid_of(f) for f in files)


def test_sending_an_instance_twice_leaves_one_copy_in_the_cloud(orthanc: OrthancPeer, tmp_path: Path) -> None:
    ct = sample_file("CT_small.dcm", tmp_path)

    async def twice(client: DicomWebClient) -> list[StowResult]:
        return [await client.stow([ct]), await client.stow([ct], study_uid=str(dcmread(ct).StudyInstanceUID))]

    first, second = run(twice, orthanc.dicomweb_url)

    # Orthanc answers a re-sent instance with a plain success, not a failure or a warning.
    assert first.stored == second.stored == {uid_of(ct)}
    assert second.failed == {} and second.http_status == 200
    assert orthanc.instance_count() == 1


def test_instances_of_another_study_are_refused_per_instance(orthanc: OrthancPeer, tmp_path: Path) -> None:
    ct, mr = sample_file("CT_small.dcm", tmp_path), sample_file("MR_small.dcm", tmp_path)

    result = run(lambda c: c.stow([ct, mr], study_uid=str(dcmread(ct).StudyInstanceUID)), orthanc.dicomweb_url)

    # Orthanc answers a partial success with 409 (the standard says 202): the body decides.
    assert result.http_status == 409
    assert result.stored == {uid_of(ct)}
    assert list(result.failed) == [uid_of(mr)]
    assert result.failed[uid_of(mr)].startswith("0x0110")  # Orthanc's FailureReason: processing failure
    assert orthanc.sop_instance_uids() == [uid_of(ct)]


def test_a_file_that_is_not_dicom_is_refused_for_good(orthanc: OrthancPeer, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a DICOM file at all\n" * 10)
    mr = sample_file("MR_small.dcm", tmp_path)

    with pytest.raises(DicomWebError) as caught:
        run(lambda c: c.stow([junk, mr]), orthanc.dicomweb_url)

    assert caught.value.status == 400
    assert caught.value.transient is False
    assert "1 stored" in caught.value.reason
    # Orthanc keeps the valid instance of the refused request, and says so.
    assert caught.value.partial is not None and caught.value.partial.stored == {uid_of(mr)}
    assert orthanc.sop_instance_uids() == [uid_of(mr)]


def test_bandwidth_cap_paces_the_upload(orthanc: OrthancPeer, tmp_path: Path) -> None:
    files = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    for seed, path in enumerate(files):
        make_dx(path, rows=256, cols=256, seed=seed)
    total = sum(f.stat().st_size for f in files)
    rate = 400_000  # bytes/s: about 0.65 s for this body

    started = time.monotonic()
    result = run(lambda c: c.stow(files, rate_limit_bps=rate), orthanc.dicomweb_url)
    elapsed = time.monotonic() - started

    assert result.stored == {uid_of(f) for f in files}
    # The first burst (a tenth of a second's worth) is free; the rest is paced.
    assert elapsed >= (total - rate / 10) / rate * 0.9


# ---------------------------------------------------------------- QIDO-RS and WADO-RS


def test_instance_exists_only_for_what_the_cloud_holds(orthanc: OrthancPeer, tmp_path: Path) -> None:
    ct = sample_file("CT_small.dcm", tmp_path)
    study = str(dcmread(ct).StudyInstanceUID)
    orthanc.upload(ct)

    async def checks(client: DicomWebClient) -> tuple[bool, bool, bool, set[str], list[dict[str, Any]]]:
        return (
            await client.instance_exists(study, uid_of(ct)),
            await client.instance_exists(study, generate_uid()),
            await client.instance_exists(generate_uid(), uid_of(ct)),
            await client.existing_instances(study, [uid_of(ct), generate_uid()]),
            await client.find_instances(study),
        )

    present, absent, other_study, existing, found = run(checks, orthanc.dicomweb_url)

    assert (present, absent, other_study) == (True, False, False)
    assert existing == {uid_of(ct)}
    assert [json_value(i, SOP_INSTANCE_UID) for i in found] == [uid_of(ct)]
    assert json_value(found[0], STUDY_INSTANCE_UID) == study


def test_reader_reports_are_found_and_nothing_else(orthanc: OrthancPeer, tmp_path: Path) -> None:
    image = make_dx(tmp_path / "dx.dcm", rows=64, cols=64)
    sr = make_text_sr(tmp_path / "sr.dcm", image)
    pdf = make_pdf_report(tmp_path / "pdf.dcm", image)
    dose = make_text_sr(tmp_path / "dose.dcm", image, text="dose", sop_class=DOSE_SR)
    unreported = make_dx(tmp_path / "other.dcm", rows=64, cols=64, seed=1)
    for name in ("dx.dcm", "sr.dcm", "pdf.dcm", "dose.dcm", "other.dcm"):
        assert orthanc.upload(tmp_path / name)["Status"] == "Success"

    async def search(client: DicomWebClient) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return (
            await client.find_report_instances(str(image.StudyInstanceUID)),
            await client.find_report_instances(str(unreported.StudyInstanceUID)),
        )

    reports, none = run(search, orthanc.dicomweb_url)

    assert {json_value(r, SOP_INSTANCE_UID) for r in reports} == {sr.SOPInstanceUID, pdf.SOPInstanceUID}
    assert dose.SOPInstanceUID not in {json_value(r, SOP_INSTANCE_UID) for r in reports}
    assert none == []


def test_retrieved_report_is_the_instance_asked_for(orthanc: OrthancPeer, tmp_path: Path) -> None:
    image = make_dx(tmp_path / "dx.dcm", rows=64, cols=64)
    pdf = make_pdf_report(tmp_path / "pdf.dcm", image)
    orthanc.upload(tmp_path / "pdf.dcm")
    dest_dir = tmp_path / "reports"
    dest_dir.mkdir()

    async def fetch(client: DicomWebClient) -> Path:
        (report,) = await client.find_report_instances(str(image.StudyInstanceUID))
        return await client.retrieve_instance(
            str(image.StudyInstanceUID), str(json_value(report, "0020000E")),
            str(json_value(report, SOP_INSTANCE_UID)), dest_dir / "report.dcm",
        )

    path = run(fetch, orthanc.dicomweb_url)

    got = dcmread(path)
    assert path == dest_dir / "report.dcm"
    assert got.SOPInstanceUID == pdf.SOPInstanceUID
    assert bytes(got.EncapsulatedDocument).startswith(b"%PDF-1.4")
    assert [p.name for p in dest_dir.iterdir()] == ["report.dcm"]  # no .tmp left behind


def test_retrieving_a_missing_instance_is_a_permanent_error(orthanc: OrthancPeer, tmp_path: Path) -> None:
    with pytest.raises(DicomWebError) as caught:
        run(lambda c: c.retrieve_instance(generate_uid(), generate_uid(), generate_uid(), tmp_path / "x.dcm"),
            orthanc.dicomweb_url)

    assert caught.value.status == 404 and caught.value.transient is False
    assert list(tmp_path.glob("x.dcm*")) == []


# ---------------------------------------------------------------- failures: permanent or not


def test_wrong_cloud_path_is_a_permanent_error(orthanc: OrthancPeer, tmp_path: Path) -> None:
    ct = sample_file("CT_small.dcm", tmp_path)

    with pytest.raises(DicomWebError) as caught:
        run(lambda c: c.stow([ct]), orthanc.base_url + "/no-such-dicom-web")

    assert caught.value.status == 404
    assert caught.value.transient is False


def test_cloud_down_is_transient_and_the_upload_succeeds_once_it_is_back(
    orthanc: OrthancPeer, tmp_path: Path
) -> None:
    ct = sample_file("CT_small.dcm", tmp_path)
    orthanc.upload(sample_file("MR_small.dcm", tmp_path))
    orthanc.stop()

    with pytest.raises(DicomWebError) as caught:
        run(lambda c: c.stow([ct]), orthanc.dicomweb_url)
    assert caught.value.transient is True
    assert caught.value.status is None
    assert caught.value.body_sent is False  # nothing reached the cloud: safe to resend as is

    orthanc.start()
    result = run(lambda c: c.stow([ct]), orthanc.dicomweb_url)
    assert result.stored == {uid_of(ct)}
    assert orthanc.instance_count() == 2  # what it had before going down is still there


def test_service_unavailable_is_transient(tmp_path: Path) -> None:
    ct = sample_file("CT_small.dcm", tmp_path)

    async def unavailable(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=503, text="<html>maintenance</html>", headers={"Retry-After": "120"})

    async def attempt() -> DicomWebError:
        async with misbehaving_server(unavailable) as url, aiohttp.ClientSession(timeout=TIMEOUT) as session:
            with pytest.raises(DicomWebError) as caught:
                await DicomWebClient(session, url).stow([ct])
            return caught.value

    error = asyncio.run(attempt())
    assert error.status == 503
    assert error.transient is True
    assert error.retry_after == 120.0
    assert "maintenance" in error.reason


def test_hang_after_the_body_is_transient_and_ambiguous(tmp_path: Path) -> None:
    ct = sample_file("CT_small.dcm", tmp_path)
    received: list[int] = []

    async def attempt() -> DicomWebError:
        release = asyncio.Event()

        async def swallow_then_hang(request: web.Request) -> web.Response:
            received.append(len(await request.read()))
            await asyncio.wait_for(release.wait(), 30)
            return web.Response(status=500)

        async with misbehaving_server(swallow_then_hang) as url, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=1.0)
        ) as session:
            try:
                with pytest.raises(DicomWebError) as caught:
                    await DicomWebClient(session, url).stow([ct])
                return caught.value
            finally:
                release.set()

    error = asyncio.run(attempt())
    assert received and received[0] > ct.stat().st_size  # the server had all of it
    assert error.transient is True
    assert error.body_sent is True  # may have been stored: check with QIDO-RS before resending
    assert error.status is None


def test_connection_dropped_after_the_body_is_transient_and_ambiguous(tmp_path: Path) -> None:
    ct = sample_file("CT_small.dcm", tmp_path)

    async def swallow_then_drop(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(1)
        return web.Response(status=500)

    async def attempt() -> DicomWebError:
        async with misbehaving_server(swallow_then_drop) as url, aiohttp.ClientSession(timeout=TIMEOUT) as session:
            with pytest.raises(DicomWebError) as caught:
                await DicomWebClient(session, url).stow([ct])
            return caught.value

    error = asyncio.run(attempt())
    assert error.transient is True
    assert error.body_sent is True
