"""The fault proxy between the DICOMweb client and a real Orthanc does what each fault says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest
from pydicom import dcmread

from sync.dicomweb import DicomWebClient, DicomWebError, StowResult
from tests.dicom_factory import make_dx
from tests.peers.fault_proxy import FaultProxy
from tests.peers.orthanc import OrthancPeer, start_orthanc

T = TypeVar("T")
TIMEOUT = aiohttp.ClientTimeout(total=20, connect=3)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    peer = start_orthanc(tmp_path_factory.mktemp("cloud"))
    yield peer
    peer.kill()


@pytest.fixture
def proxy(orthanc: OrthancPeer) -> Iterator[FaultProxy]:
    with FaultProxy(orthanc.base_url) as p:
        yield p


def run(make: Callable[[DicomWebClient], Awaitable[T]], base_url: str,
        timeout: aiohttp.ClientTimeout = TIMEOUT) -> T:
    async def main() -> T:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await make(DicomWebClient(session, base_url))

    return asyncio.run(main())


def stow(proxy: FaultProxy, files: list[Path], timeout: aiohttp.ClientTimeout = TIMEOUT) -> StowResult:
    return run(lambda c: c.stow(files), proxy.url + "/dicom-web", timeout)


def stow_error(proxy: FaultProxy, files: list[Path], timeout: aiohttp.ClientTimeout = TIMEOUT) -> DicomWebError:
    with pytest.raises(DicomWebError) as info:
        stow(proxy, files, timeout)
    return info.value


def images(tmp_path: Path, n: int = 1, size: int = 256) -> tuple[list[Path], list[str]]:
    study = None
    paths, uids = [], []
    for i in range(n):
        ds = make_dx(tmp_path / f"dx{i}.dcm", rows=size, cols=size, study_uid=study, seed=i)
        study = str(ds.StudyInstanceUID)
        paths.append(tmp_path / f"dx{i}.dcm")
        uids.append(str(ds.SOPInstanceUID))
    return paths, uids


def in_cloud(orthanc: OrthancPeer, uids: list[str]) -> list[str]:
    held = orthanc.sop_instance_uids()
    return [uid for uid in uids if uid in held]


def test_pass_through_stores_and_records_every_instance(tmp_path: Path, proxy: FaultProxy, orthanc: OrthancPeer) -> None:
    files, uids = images(tmp_path, 3)
    result = stow(proxy, files)
    assert result.stored == set(uids)
    assert in_cloud(orthanc, uids) == uids
    (record,) = proxy.wait_for(1)
    assert (record.method, record.status, record.forwarded, record.upstream_status) == ("POST", 200, True, 200)
    assert record.path == "/dicom-web/studies"
    assert record.sop_instance_uids == uids
    assert record.body_bytes == result.bytes_sent > sum(p.stat().st_size for p in files)
    assert proxy.stored_uploads() == {uid: 1 for uid in uids}


def test_pass_through_streams_a_dr_size_body(tmp_path: Path, proxy: FaultProxy, orthanc: OrthancPeer) -> None:
    files, uids = images(tmp_path, 2, size=2048)  # 2 x 8 MB
    assert stow(proxy, files).stored == set(uids)
    assert proxy.wait_for(1)[0].sop_instance_uids == uids
    assert in_cloud(orthanc, uids) == uids


def test_injected_503_is_transient_and_nothing_reaches_the_cloud(
    tmp_path: Path, proxy: FaultProxy, orthanc: OrthancPeer
) -> None:
    files, uids = images(tmp_path)
    proxy.set_mode("status", status=503, retry_after=7)
    error = stow_error(proxy, files)
    assert (error.status, error.transient, error.retry_after) == (503, True, 7.0)
    assert "injected HTTP 503" in error.reason
    (record,) = proxy.wait_for(1)
    assert (record.status, record.forwarded) == (503, False)
    assert record.sop_instance_uids == uids  # read whole before answering
    assert proxy.stored_uploads() == {}
    assert in_cloud(orthanc, uids) == []


def test_injected_400_is_permanent(tmp_path: Path, proxy: FaultProxy) -> None:
    files, _ = images(tmp_path)
    proxy.set_mode("status", status=400, body="bad request")
    error = stow_error(proxy, files)
    assert (error.status, error.transient) == (400, False)


def test_lost_answer_after_the_cloud_stored_counts_as_an_upload(
    tmp_path: Path, proxy: FaultProxy, orthanc: OrthancPeer
) -> None:
    files, uids = images(tmp_path)
    proxy.set_mode("status", status=502, forward=True)
    error = stow_error(proxy, files)
    assert (error.status, error.transient) == (502, True)
    assert in_cloud(orthanc, uids) == uids
    (record,) = proxy.wait_for(1)
    assert (record.forwarded, record.upstream_status, record.status) == (True, 200, 502)
    assert proxy.stored_uploads() == {uids[0]: 1}


def test_reset_after_body_leaves_the_instance_in_the_cloud_but_the_client_unsure(
    tmp_path: Path, proxy: FaultProxy, orthanc: OrthancPeer
) -> None:
    files, uids = images(tmp_path)
    proxy.set_mode("reset_after_body")
    error = stow_error(proxy, files)
    assert error.status is None
    assert error.transient and error.body_sent
    assert in_cloud(orthanc, uids) == uids
    (record,) = proxy.wait_for(1)
    assert (record.forwarded, record.status) == (True, None)
    assert proxy.stored_uploads() == {uids[0]: 1}


def test_reset_mid_body_stores_nothing_and_the_body_was_not_sent(
    tmp_path: Path, proxy: FaultProxy, orthanc: OrthancPeer
) -> None:
    files, uids = images(tmp_path, size=2048)  # 8 MB: more than the socket buffers hold
    proxy.set_mode("reset_mid_body", after_bytes=100_000)
    error = stow_error(proxy, files)
    assert error.status is None
    assert error.transient and not error.body_sent
    (record,) = proxy.wait_for(1)
    assert record.body_bytes >= 100_000 and record.body_bytes < files[0].stat().st_size
    assert (record.forwarded, record.status, record.sop_instance_uids) == (False, None, [])
    assert proxy.stored_uploads() == {}
    assert in_cloud(orthanc, uids) == []


def test_hang_holds_the_answer_until_the_client_gives_up(
    tmp_path: Path, proxy: FaultProxy, orthanc: OrthancPeer
) -> None:
    files, uids = images(tmp_path)
    proxy.set_mode("hang", forward=True)
    started = time.monotonic()
    error = stow_error(proxy, files, aiohttp.ClientTimeout(total=1.5))
    assert 1.4 < time.monotonic() - started < 5
    assert error.transient and error.body_sent and "timed out" in error.reason
    (record,) = proxy.wait_for(1, timeout=5)
    assert (record.forwarded, record.status) == (True, None)
    assert in_cloud(orthanc, uids) == uids


def test_down_refuses_every_request(tmp_path: Path, proxy: FaultProxy, orthanc: OrthancPeer) -> None:
    files, uids = images(tmp_path)
    proxy.set_mode("down")
    error = stow_error(proxy, files)
    assert error.status is None and error.transient
    assert proxy.stored_uploads() == {}
    assert in_cloud(orthanc, uids) == []


def test_slow_throttles_the_upload_to_the_rate_asked(tmp_path: Path, proxy: FaultProxy, orthanc: OrthancPeer) -> None:
    files, uids = images(tmp_path, size=512)  # ~0.5 MB
    size = files[0].stat().st_size
    proxy.set_mode("slow", bps=size // 1)  # about one second
    started = time.monotonic()
    assert stow(proxy, files).stored == set(uids)
    assert 0.9 < time.monotonic() - started < 4


def test_fail_next_then_back_to_pass_counts_a_retried_upload_twice(
    tmp_path: Path, proxy: FaultProxy, orthanc: OrthancPeer
) -> None:
    files, uids = images(tmp_path, 2)
    proxy.fail_next(1, "reset_after_body")
    error = stow_error(proxy, files)
    assert error.body_sent
    assert stow(proxy, files).stored == set(uids)  # a blind retry: the cloud gets it twice
    records = proxy.wait_for(2)
    assert [r.mode for r in records] == ["reset_after_body", "pass"]
    assert proxy.stored_uploads() == {uid: 2 for uid in uids}
    assert sorted(orthanc.sop_instance_uids()).count(uids[0]) == 1  # Orthanc itself keeps one


def test_qido_goes_through_and_is_not_counted_as_an_upload(
    tmp_path: Path, proxy: FaultProxy, orthanc: OrthancPeer
) -> None:
    files, uids = images(tmp_path)
    assert stow(proxy, files).stored == set(uids)
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert run(lambda c: c.existing_instances(study, uids), proxy.url + "/dicom-web") == set(uids)
    records = proxy.wait_for(2)
    assert records[1].method == "GET" and records[1].status == 200
    assert proxy.stored_uploads() == {uids[0]: 1}


def test_unknown_mode_is_refused(orthanc: OrthancPeer) -> None:
    proxy = FaultProxy(orthanc.base_url)
    with pytest.raises(ValueError, match="unknown mode"):
        proxy.set_mode("flaky")
