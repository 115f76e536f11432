"""The upload step decodes nothing it cannot afford: unfit instances are quarantined at once, the rest go.

The files were kept under lax limits (as before the limits existed, or with the keys
raised); the sync service then runs with the defaults against a real Orthanc. It must
quarantine the bomb and the flood after one attempt with a reason a technician can
read, send the rest (an instance of many elements unparsed, as stored), and stay under
the node's memory cap while doing so. And a cloud answering a report fetch with far
more than a report is refused before it fills memory or disk, and asked again later.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from pydicom import dcmread

from edge.store.models import Study, utcnow
from sync.compress import MAX_COMPRESS_ELEMENTS
from sync.reports import ReportPuller, ReportSettings
from sync.tables import ReportRetry
from tests.conftest import EdgeNode
from tests.dicom_factory import DX_STORAGE, make_dx
from tests.edge.helpers import query, raw_store
from tests.edge.hostile_files import MiB, peak_rss_mb, write_deflate_bomb, write_deflated_dx, write_element_flood
from tests.peers.orthanc import OrthancPeer
from tests.sync.test_dicomweb import make_text_sr, misbehaving_server
from tests.sync.test_reports import data_dir, poll, receive  # noqa: F401 - data_dir is a fixture
from tests.waiting import wait_until

DEFLATED = "1.2.840.10008.1.2.1.99"
NODE_MEMORY_CAP_MB = 350
LAX = {"max_instance_mb": 2048, "max_deflate_ratio": 10000, "max_elements": 10_000_000}
FAST_SYNC = {"retry_min_s": 0.2, "retry_max_s": 1.0, "poll_interval_s": 0.5, "compress": "jpeg-ls"}



def outbox(node: EdgeNode) -> dict[str, tuple[str, int, str]]:
    rows = query(
        node,
        "select sop_instance_uid, state, attempts, last_error from outbox join instance on instance.id = outbox.instance_id",
    )
    return {uid: (state, attempts, error) for uid, state, attempts, error in rows}


def test_unfit_instances_are_quarantined_after_one_attempt_and_the_rest_upload(
    node_factory: Any, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    bomb_uid = write_deflate_bomb(files / "bomb.dcm", inflated_bytes=512 * MiB)
    flood_uid = write_element_flood(files / "flood.dcm", elements=2_000_000)
    # Allowed, too many to parse for compression; no more than that: Orthanc takes seconds per 10k elements.
    many_uid = write_element_flood(files / "many.dcm", elements=MAX_COMPRESS_ELEMENTS + 10_000)
    deflated_uid = write_deflated_dx(files / "deflated.dcm", rows=256, cols=256)
    plain = make_dx(files / "plain.dcm", rows=256, cols=256)
    sent = [("bomb.dcm", DEFLATED), ("flood.dcm", None), ("many.dcm", None), ("deflated.dcm", DEFLATED), ("plain.dcm", None)]

    sections: dict[str, Any] = {"cloud": {"dicomweb_url": orthanc.dicomweb_url}, "reports": {"enabled": False}}
    dicom = node_factory(storage=LAX, **sections).start()  # keeps what default limits would refuse
    for name, syntax in sent:
        assert raw_store(dicom, files / name, DX_STORAGE, syntax or "1.2.840.10008.1.2.1") == (0, ""), name
    dicom.stop()

    sync = node_factory(command=("serve", "sync"), sync=FAST_SYNC, **sections).start()  # same data, default limits
    assert sync.proc is not None

    def settled() -> dict[str, tuple[str, int, str]] | None:
        rows = outbox(sync)
        return rows if all(state in ("synced", "quarantined") for state, _, _ in rows.values()) else None

    rows = wait_until(settled, timeout=120.0, what="every instance synced or quarantined")

    assert rows[bomb_uid] == ("quarantined", 0, "not sent: inflates over 50x ([storage] max_deflate_ratio)")
    assert rows[flood_uid] == ("quarantined", 0, "not sent: over 200000 elements ([storage] max_elements)")
    assert {uid: rows[uid][0] for uid in (many_uid, deflated_uid, str(plain.SOPInstanceUID))} == {
        many_uid: "synced", deflated_uid: "synced", str(plain.SOPInstanceUID): "synced"
    }
    assert sorted(orthanc.sop_instance_uids()) == sorted([many_uid, deflated_uid, str(plain.SOPInstanceUID)])
    studies = {s["study_instance_uid"]: s["sync_state"] for s in sync.studies()}
    assert sorted(studies.values()) == ["quarantined", "quarantined", "synced", "synced", "synced"]

    peak = peak_rss_mb(sync.proc.pid)
    assert peak < NODE_MEMORY_CAP_MB, f"sync peaked at {peak:.0f} MB"
    log = sync.log_text()
    for uid in (bomb_uid, flood_uid):  # one attempt, one line: not retried
        assert len([line for line in log.splitlines() if f"instance {uid}" in line and "quarantined" in line]) == 1
    assert "Traceback" not in log

    # The many-element instance went as stored, never parsed: the cloud holds its exact elements.
    orthanc_id = next(i for i in orthanc.get("/instances") if orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] == many_uid)
    import urllib.request

    with urllib.request.urlopen(f"{orthanc.base_url}/instances/{orthanc_id}/file", timeout=30) as resp:
        (tmp_path / "back.dcm").write_bytes(resp.read())
    assert len(dcmread(tmp_path / "back.dcm")) == len(dcmread(files / "many.dcm"))


def test_a_report_answer_far_too_large_is_refused_unread_and_asked_for_again_later(
    orthanc: OrthancPeer, data_dir: Path  # noqa: F811 - the fixture
) -> None:
    image = receive(data_dir, orthanc)
    study_uid = str(image.StudyInstanceUID)
    report = make_text_sr(data_dir.parent / "sr.dcm", image, "No abnormality.")
    assert orthanc.upload(data_dir.parent / "sr.dcm")["Status"] == "Success"
    streamed: list[int] = []
    claimed = 2 * 1024 * MiB

    async def cloud(request: web.Request) -> web.StreamResponse:
        """Orthanc for the queries; for the report itself, a body of 2 GB that never ends early."""
        if str(report.SOPInstanceUID) not in request.path:
            async with aiohttp.ClientSession() as session, session.get(
                orthanc.base_url + request.path_qs, headers={"Accept": "application/dicom+json"}
            ) as upstream:
                return web.Response(status=upstream.status, body=await upstream.read(),
                                    headers={"Content-Type": upstream.headers.get("Content-Type", "application/dicom+json")})
        response = web.StreamResponse(headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
        await response.prepare(request)
        await response.write(b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 128 + b"DICM")
        streamed.append(0)
        chunk = b"\0" * MiB
        try:
            while streamed[0] < claimed:
                await response.write(chunk)
                streamed[0] += len(chunk)
        except (ConnectionResetError, RuntimeError):  # the node hung up
            pass
        return response

    async def pull() -> int:
        async with misbehaving_server(cloud) as url:
            return await asyncio.to_thread(poll, ReportPuller(data_dir, ReportSettings(max_report_bytes=4 * MiB)), url)

    assert asyncio.run(pull()) == 0
    assert streamed and streamed[0] < 256 * MiB  # the node stopped reading long before 2 GB
    study = Study.get(Study.study_instance_uid == study_uid)
    assert study.report_state == "none"
    row = ReportRetry.get(ReportRetry.study == study.id)
    assert row.sop_instance_uid == report.SOPInstanceUID
    assert "over 4 MB ([reports] max_report_mb): not kept" in row.reason
    assert row.next_try_at > utcnow() + dt.timedelta(minutes=30)  # asked again later, not in a loop
    assert list((data_dir / "reports").rglob("*")) in ([], [data_dir / "reports" / study_uid])  # nothing half-kept


def test_compression_never_parses_what_it_cannot_afford(tmp_path: Path) -> None:
    import pytest

    from sync.compress import UnfitForUpload, prepare_upload

    bomb = tmp_path / "bomb.dcm"
    write_deflate_bomb(bomb, inflated_bytes=512 * MiB)
    with pytest.raises(UnfitForUpload, match=r"inflates over 50x \(\[storage\] max_deflate_ratio\)"):
        prepare_upload(bomb, tmp_path / "tmp", "jpeg-ls")
    with pytest.raises(UnfitForUpload):  # sent as stored it would still be a bomb for the cloud: not sent either
        prepare_upload(bomb, tmp_path / "tmp", "none")

    many = tmp_path / "many.dcm"
    write_element_flood(many, elements=60_000)
    prepared = prepare_upload(many, tmp_path / "tmp", "jpeg-ls")
    assert (prepared.path, prepared.temporary) == (many, False)
    assert prepared.note == "60017 elements are too many to compress in memory: sent as is"

    deflated = tmp_path / "deflated.dcm"
    write_deflated_dx(deflated, rows=256, cols=256)
    prepared = prepare_upload(deflated, tmp_path / "tmp", "jpeg-ls")  # an ordinary deflated image still compresses
    assert prepared.temporary and prepared.transfer_syntax == "1.2.840.10008.1.2.4.80"
    assert (dcmread(prepared.path).pixel_array == dcmread(deflated).pixel_array).all()
