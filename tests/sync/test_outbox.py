"""Store-and-forward end to end: DCMTK storescu -> the node -> a real Orthanc (DICOMweb).

The node runs as real processes (``edge run`` or ``edge serve dicom`` + ``edge serve
sync``); faults come from tests/peers/fault_proxy.py between the node and Orthanc.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.conftest import EdgeNode, edge_cli
from tests.dicom_factory import make_dx
from tests.peers.fault_proxy import FaultProxy
from tests.peers.orthanc import OrthancPeer
from tests.waiting import wait_until

FAST_SYNC = {"retry_min_s": 0.2, "retry_max_s": 1.0, "poll_interval_s": 0.5, "compress": "none"}
FAST_REPORTS = {"enabled": False}




@pytest.fixture
def proxy(orthanc: OrthancPeer) -> Iterator[FaultProxy]:
    with FaultProxy(orthanc.base_url) as p:
        yield p




def all_synced(node: EdgeNode, expected_studies: int) -> bool:
    studies = node.studies()
    return len(studies) == expected_studies and all(s["sync_state"] == "synced" for s in studies)


def dx_series(where: Path, count: int, study_uid: str | None = None, size: int = 256, accession: str = "ACC1") -> list[Path]:
    where.mkdir(parents=True, exist_ok=True)
    first = make_dx(where / "0.dcm", rows=size, cols=size, study_uid=study_uid, accession=accession)
    files = [where / "0.dcm"]
    for i in range(1, count):
        make_dx(where / f"{i}.dcm", rows=size, cols=size, study_uid=first.StudyInstanceUID,
                series_uid=first.SeriesInstanceUID, accession=accession, seed=i)
        files.append(where / f"{i}.dcm")
    return files


def uids(files: list[Path]) -> list[str]:
    return [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def test_studies_reach_the_cloud_without_anyone_doing_anything(
    node_factory: Any, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    node = node_factory(
        command=("run",), cloud={"dicomweb_url": orthanc.dicomweb_url}, sync=FAST_SYNC, reports=FAST_REPORTS
    ).start()
    files = dx_series(tmp_path / "a", 3, accession="ACC-A") + dx_series(tmp_path / "b", 2, accession="ACC-B")
    assert node.storescu(*files).returncode == 0

    wait_until(lambda: all_synced(node, 2), what="both studies synced")
    assert sorted(orthanc.sop_instance_uids()) == sorted(uids(files))  # none lost, none twice
    status = node.status()
    assert status["outbox"]["depth"] == 0
    assert status["outbox"]["last_upload_at"] is not None
    assert "synced" in edge_cli(node.config, "studies").stdout

    with urllib.request.urlopen(f"http://127.0.0.1:{node.console_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert "edge_sync_instances_synced_total 5.0" in metrics
    assert "edge_outbox_depth 0.0" in metrics


def test_sync_state_moves_pending_then_sending_then_synced(
    node_factory: Any, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    """DICOM and sync as separate services (as systemd runs them); a slow link shows 'sending'."""
    sections = {"cloud": {"dicomweb_url": orthanc.dicomweb_url}, "reports": FAST_REPORTS,
                "sync": {**FAST_SYNC, "bandwidth_bps": 400_000}}
    dicom = node_factory(**sections).start()
    files = dx_series(tmp_path / "a", 2, size=700)  # ~1 MB each: ~5 s at the cap
    assert dicom.storescu(*files).returncode == 0
    assert [s["sync_state"] for s in dicom.studies()] == ["pending"]

    sync = node_factory.another_service(dicom, ("serve", "sync")).start()  # the same node: one edge.toml
    seen: list[str] = []

    def observe() -> bool:
        state = dicom.studies()[0]["sync_state"]
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "synced"

    wait_until(observe, timeout=60, what="study synced")
    assert seen in (["sending", "synced"], ["pending", "sending", "synced"]), seen
    assert sorted(orthanc.sop_instance_uids()) == sorted(uids(files))
    sync.stop()


def test_link_down_keep_scanning_then_everything_arrives_once_ecg_first(
    node_factory: Any, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    node = node_factory(
        command=("run",), cloud={"dicomweb_url": orthanc.dicomweb_url}, reports=FAST_REPORTS,
        sync={**FAST_SYNC, "concurrency": 1},
    ).start()
    orthanc.stop()  # the cable is pulled
    routine = dx_series(tmp_path / "routine", 4, accession="ROUTINE")
    assert node.storescu(*routine).returncode == 0
    ecg = Path(shutil.copy(get_testdata_file("waveform_ecg.dcm"), tmp_path / "ecg.dcm"))
    assert node.storescu(ecg).returncode == 0  # scanning goes on while the cloud is away

    failed = wait_until(
        lambda: next((s for s in node.studies() if s["sync_state"] == "failed"), None), what="a failed attempt"
    )
    assert "could not connect" in failed["last_error"] or "closed" in failed["last_error"]
    assert node.status()["outbox"]["depth"] == 5

    orthanc.start()  # the cable is back
    wait_until(lambda: all_synced(node, 2), what="everything synced")
    held = orthanc.sop_instance_uids()
    assert sorted(held) == sorted(uids(routine + [ecg]))
    changes = orthanc.get("/changes?limit=100")["Changes"]
    order = [orthanc.get(f"/instances/{c['ID']}")["MainDicomTags"]["SOPInstanceUID"]
             for c in changes if c["ChangeType"] == "NewInstance"]
    assert order[0] == uids([ecg])[0], "the ECG goes before routine images"


@pytest.mark.parametrize(
    "mode,opts",
    [
        ("status", {"status": 500}),
        ("status", {"status": 503, "retry_after": 1}),
        ("reset_mid_body", {"after_bytes": 50_000}),
        ("down", {}),
    ],
)
def test_cloud_faults_are_retried_and_nothing_is_stored_twice(
    node_factory: Any, proxy: FaultProxy, orthanc: OrthancPeer, tmp_path: Path, mode: str, opts: dict[str, Any]
) -> None:
    proxy.fail_next(2, mode, **opts)
    node = node_factory(
        command=("run",), cloud={"dicomweb_url": proxy.url + "/dicom-web"}, sync=FAST_SYNC, reports=FAST_REPORTS
    ).start()
    files = dx_series(tmp_path / "a", 3)
    assert node.storescu(*files).returncode == 0
    wait_until(lambda: all_synced(node, 1), what="study synced after the faults")
    assert sorted(orthanc.sop_instance_uids()) == sorted(uids(files))
    assert all(n == 1 for n in proxy.stored_uploads().values()), proxy.stored_uploads()
    assert node.status()["outbox"]["by_state"].get("quarantined", 0) == 0


@pytest.mark.parametrize(
    "mode,opts",
    [
        ("reset_after_body", {}),  # the cloud stored it, the answer was lost
        ("status", {"status": 502, "forward": True}),  # a gateway error after the cloud stored it
        ("hang", {"forward": True}),  # the answer never comes
    ],
)
def test_after_an_ambiguous_failure_the_cloud_is_asked_before_resending(
    node_factory: Any, proxy: FaultProxy, orthanc: OrthancPeer, tmp_path: Path, mode: str, opts: dict[str, Any]
) -> None:
    proxy.fail_next(1, mode, **opts)
    node = node_factory(
        command=("run",), cloud={"dicomweb_url": proxy.url + "/dicom-web", "read_timeout_s": 2.0},
        sync=FAST_SYNC, reports=FAST_REPORTS,
    ).start()
    files = dx_series(tmp_path / "a", 2)
    assert node.storescu(*files).returncode == 0
    wait_until(lambda: all_synced(node, 1), what="study synced")
    assert sorted(orthanc.sop_instance_uids()) == sorted(uids(files))
    # Sent once, and never again: the QIDO-RS check found them in the cloud.
    assert proxy.stored_uploads() == {uid: 1 for uid in uids(files)}
    assert any(r.method == "GET" and "/instances" in r.path for r in proxy.requests), "no QIDO-RS check"


def test_a_permanent_rejection_is_quarantined_and_edge_retry_sends_it_after_the_fix(
    node_factory: Any, proxy: FaultProxy, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    proxy.set_mode("status", status=400, body='{"Message": "instance rejected by the cloud policy"}')
    node = node_factory(
        command=("run",), cloud={"dicomweb_url": proxy.url + "/dicom-web"}, sync=FAST_SYNC, reports=FAST_REPORTS
    ).start()
    files = dx_series(tmp_path / "a", 2)
    assert node.storescu(*files).returncode == 0

    wait_until(lambda: [s for s in node.studies() if s["sync_state"] == "quarantined"], what="quarantine")
    study = node.studies()[0]
    assert "rejected by the cloud policy" in study["last_error"]
    assert "quarantined" in edge_cli(node.config, "status").stdout
    assert "reason:" in edge_cli(node.config, "studies").stdout
    assert orthanc.instance_count() == 0

    proxy.set_mode("pass")  # the cloud side fixed its policy
    result = edge_cli(node.config, "retry", study["study_instance_uid"])
    assert "2 quarantined instance(s) queued again" in result.stdout
    wait_until(lambda: all_synced(node, 1), what="synced after retry")
    assert sorted(orthanc.sop_instance_uids()) == sorted(uids(files))


def test_sync_killed_mid_upload_resumes_and_stores_each_instance_once(
    node_factory: Any, proxy: FaultProxy, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    sections = {"cloud": {"dicomweb_url": proxy.url + "/dicom-web"}, "reports": FAST_REPORTS,
                "sync": {**FAST_SYNC, "batch_max_instances": 2}}
    dicom = node_factory(**sections).start()
    files = dx_series(tmp_path / "a", 6, size=512)
    assert dicom.storescu(*files).returncode == 0
    proxy.set_mode("slow", bps=200_000)
    sync = node_factory.another_service(dicom, ("serve", "sync")).start()
    wait_until(lambda: any(r.is_stow and r.body_bytes > 100_000 for r in proxy.requests), what="an upload under way")
    sync.kill()  # power cut in the middle of a request body
    proxy.set_mode("pass")
    sync.start()
    wait_until(lambda: all_synced(dicom, 1), what="synced after restart")
    assert sorted(orthanc.sop_instance_uids()) == sorted(uids(files))
    completed = [r for r in proxy.requests if r.is_stow and r.upstream_status == 200]
    sent = [uid for r in completed for uid in r.sop_instance_uids]
    assert sorted(sent) == sorted(uids(files)), "each instance stored by exactly one completed upload"


def test_routine_images_wait_for_their_window_while_ecg_goes(
    node_factory: Any, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    hour = time.localtime().tm_hour
    closed = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"  # a window that is not now
    node = node_factory(
        command=("run",), cloud={"dicomweb_url": orthanc.dicomweb_url}, reports=FAST_REPORTS,
        sync={**FAST_SYNC, "routine_windows": [closed]},
    ).start()
    routine = dx_series(tmp_path / "a", 2)
    ecg = Path(shutil.copy(get_testdata_file("waveform_ecg.dcm"), tmp_path / "ecg.dcm"))
    assert node.storescu(*routine, ecg).returncode == 0
    wait_until(lambda: orthanc.instance_count() == 1, what="the ECG in the cloud")
    node.wait_for_log("routine images due but outside the upload windows")  # the worker passed the DX over
    assert orthanc.sop_instance_uids() == uids([ecg])
    states = {s["modalities"][0]: s["sync_state"] for s in node.studies()}
    assert states == {"ECG": "synced", "DX": "pending"}


def test_compressed_upload_is_pixel_identical_and_the_local_copy_untouched(
    node_factory: Any, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    import numpy as np

    node = node_factory(
        command=("run",), cloud={"dicomweb_url": orthanc.dicomweb_url}, reports=FAST_REPORTS,
        sync={**FAST_SYNC, "compress": "jpeg-ls"},
    ).start()
    source = Path(get_testdata_file("CT_small.dcm"))
    assert node.storescu(source, extra=("-xe",)).returncode == 0
    wait_until(lambda: all_synced(node, 1), what="synced")
    original = dcmread(source)
    orthanc_id = orthanc.get("/instances")[0]
    request = urllib.request.Request(f"{orthanc.base_url}/instances/{orthanc_id}/file")
    cloud_path = tmp_path / "cloud.dcm"
    with urllib.request.urlopen(request, timeout=10) as resp:
        cloud_path.write_bytes(resp.read())
    cloud = dcmread(cloud_path)
    assert cloud.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless
    assert np.array_equal(cloud.pixel_array, original.pixel_array)
    local = node.data_dir / "spool" / original.StudyInstanceUID / f"{original.SOPInstanceUID}.dcm"
    assert dcmread(local).file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


def test_secrets_file_readable_by_others_stops_start_up(node_factory: Any, tmp_path: Path) -> None:
    secrets = tmp_path / "cloud.secrets"
    secrets.write_text('token = "abc"\n')
    secrets.chmod(0o644)
    node = node_factory(command=("serve", "sync"), cloud={"secrets_file": str(secrets)})
    result = subprocess.run(
        [*_edge(node), "serve", "sync"], capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "[cloud] secrets_file" in result.stderr and "chmod 600" in result.stderr


def test_cloud_credentials_from_the_secrets_file_are_used(node_factory: Any, tmp_path: Path) -> None:
    orthanc = OrthancPeer(tmp_path / "auth-orthanc", extra_config={
        "AuthenticationEnabled": True, "RegisteredUsers": {"clinic": "s3cret"},
    }).start()
    try:
        secrets = tmp_path / "cloud.secrets"
        secrets.write_text('username = "clinic"\npassword = "wrong"\n')
        secrets.chmod(0o600)
        node = node_factory(
            command=("run",), cloud={"dicomweb_url": orthanc.dicomweb_url, "secrets_file": str(secrets)},
            sync=FAST_SYNC, reports=FAST_REPORTS,
        ).start()
        files = dx_series(tmp_path / "a", 1)
        assert node.storescu(*files).returncode == 0
        refused = wait_until(
            lambda: next((s for s in node.studies() if s["sync_state"] == "failed"), None), what="refused credentials"
        )
        assert "HTTP 401" in refused["last_error"]  # kept queued, not quarantined
        assert node.status()["outbox"]["by_state"].get("quarantined", 0) == 0
        node.stop()

        secrets.write_text('username = "clinic"\npassword = "s3cret"\n')
        node.start()
        wait_until(lambda: all_synced(node, 1), what="synced with the right password")
        assert orthanc.sop_instance_uids() == uids(files)
    finally:
        orthanc.kill()


def _edge(node: EdgeNode) -> list[str]:
    import sys

    return [sys.executable, "-m", "edge", "--config", str(node.config)]



def test_the_readers_report_comes_back_to_the_node(node_factory: Any, orthanc: OrthancPeer, tmp_path: Path) -> None:
    from tests.sync.test_dicomweb import make_text_sr

    node = node_factory(
        command=("run",), cloud={"dicomweb_url": orthanc.dicomweb_url}, sync=FAST_SYNC,
        reports={"poll_interval_s": 1.0, "min_backoff_s": 0.5, "max_backoff_s": 1.0},
    ).start()
    files = dx_series(tmp_path / "a", 1)
    assert node.storescu(*files).returncode == 0
    wait_until(lambda: all_synced(node, 1), what="synced")
    assert node.studies()[0]["report_state"] == "none"

    report = make_text_sr(tmp_path / "sr.dcm", dcmread(files[0]), text="Right lower lobe consolidation.")
    report.VerificationFlag = "VERIFIED"  # the remote reader signs the report (only a verified one is ready)
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    orthanc.upload(tmp_path / "sr.dcm")
    wait_until(lambda: node.studies()[0]["report_state"] == "ready", what="report ready", detail=lambda: node.log_text()[-3000:])
    kept = list((node.data_dir / "reports").rglob("*.dcm"))
    assert [dcmread(p).SOPInstanceUID for p in kept] == [report.SOPInstanceUID]
    assert "ready" in edge_cli(node.config, "studies").stdout
