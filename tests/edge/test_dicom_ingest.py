"""The clinic's DR (DCMTK echoscu/storescu, real processes) sends to the node."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.conftest import DCMTK, EdgeNode, edge_cli
from tests.dicom_factory import make_dx

# (file, storescu flag proposing its transfer syntax)
SAMPLES = [
    ("CT_small.dcm", "-xe"),
    ("MR_small.dcm", "-xe"),
    ("JPEG2000.dcm", "-xw"),  # compressed: JPEG 2000
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),  # compressed: JPEG-LS lossless
    ("waveform_ecg.dcm", "-xe"),  # 12-lead ECG waveform
]


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the Part 10 preamble and file meta group."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not a Part 10 file"
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length :]


def same_elements(a: Path, b: Path) -> bool:
    """Same data elements and values; DCMTK drops dataset trailing padding and group lengths when sending."""
    def elements(path: Path) -> dict[Any, Any]:
        return {e.tag: e.value for e in dcmread(path) if e.tag != 0xFFFCFFFC and e.tag.element != 0}

    return elements(a) == elements(b)


def spool_file(node: EdgeNode, study_uid: str, sop_uid: str) -> Path:
    return node.data_dir / "spool" / study_uid / f"{sop_uid}.dcm"


def test_dr_can_echo_the_node(node: EdgeNode) -> None:
    result = subprocess.run(
        [str(DCMTK / "echoscu"), "-v", "-aet", "DR1", "-aec", "EDGE", "127.0.0.1", str(node.port)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stderr + result.stdout


@pytest.mark.parametrize("name,flag", SAMPLES)
def test_sample_file_is_kept_byte_identical_and_queued(node: EdgeNode, name: str, flag: str) -> None:
    source = Path(get_testdata_file(name))
    original = dcmread(source, stop_before_pixels=True)
    result = node.storescu(source, extra=(flag,))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Store Response (Success)" in result.stderr + result.stdout

    kept = spool_file(node, original.StudyInstanceUID, original.SOPInstanceUID)
    assert kept.exists()
    assert same_elements(kept, source)
    recorded = sqlite3.connect(node.data_dir / "edge.db").execute(
        "select sha256, size from instance where sop_instance_uid = ?", (original.SOPInstanceUID,)
    ).fetchone()
    assert recorded == (hashlib.sha256(kept.read_bytes()).hexdigest(), kept.stat().st_size)
    assert dcmread(kept).file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID

    studies = {s["study_instance_uid"]: s for s in node.studies()}
    study = studies[original.StudyInstanceUID]
    assert study["instances"] == 1
    assert study["sync_state"] == "pending"
    assert study["report_state"] == "none"
    assert study["modalities"] == [original.Modality]


def test_dr_series_listed_with_instance_counts(node: EdgeNode, tmp_path: Path) -> None:
    study_a, study_b = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    files = [make_dx(tmp_path / f"a{i}.dcm", study_uid=study_a, accession="ACC-A", seed=i) for i in range(3)]
    files += [make_dx(tmp_path / f"b{i}.dcm", study_uid=study_b, accession="ACC-B", seed=i) for i in range(2)]
    result = node.storescu(*sorted(tmp_path.glob("*.dcm")))
    assert result.returncode == 0, result.stderr
    assert len(files) == 5

    studies = {s["accession_number"]: s for s in node.studies()}
    assert studies["ACC-A"]["instances"] == 3
    assert studies["ACC-B"]["instances"] == 2
    assert {s["sync_state"] for s in studies.values()} == {"pending"}
    assert studies["ACC-A"]["modalities"] == ["DX"]
    for field in ("study_instance_uid", "accession_number", "modalities", "instances", "received_at", "sync_state", "report_state"):
        assert field in studies["ACC-A"]

    human = edge_cli(node.config, "studies").stdout
    assert "ACC-A" in human and "ACC-B" in human and "pending" in human
    assert "TEST^PATIENT" not in human  # no patient names on screen by default

    status = node.status()
    assert status["services"]["dicom"] == "up"
    assert status["outbox"]["depth"] == 5
    assert status["store"]["instances"] == 5
    assert status["store"]["files_missing"] == 0


def test_dr_size_image_is_kept(node: EdgeNode, tmp_path: Path) -> None:
    """A real DR image: 3000 x 3000 at 16 bits, ~18 MB."""
    ds = make_dx(tmp_path / "dr.dcm", rows=3000, cols=3000)
    result = node.storescu(tmp_path / "dr.dcm")
    assert result.returncode == 0, result.stderr
    kept = spool_file(node, ds.StudyInstanceUID, ds.SOPInstanceUID)
    assert kept.stat().st_size > 18_000_000
    assert dataset_bytes(kept) == dataset_bytes(tmp_path / "dr.dcm")
    recorded = sqlite3.connect(node.data_dir / "edge.db").execute(
        "select sha256 from instance where sop_instance_uid = ?", (ds.SOPInstanceUID,)
    ).fetchone()
    assert recorded == (hashlib.sha256(kept.read_bytes()).hexdigest(),)  # hashed while it arrived


def test_edge_run_serves_health_and_metrics(node_factory: Any, tmp_path: Path) -> None:
    # No cloud here: with uploads on, a failed attempt would (rightly) make /healthz "degraded".
    node = node_factory(command=("run",), sync={"enabled": False}).start()
    make_dx(tmp_path / "one.dcm")
    assert node.storescu(tmp_path / "one.dcm").returncode == 0

    with urllib.request.urlopen(f"http://127.0.0.1:{node.console_port}/healthz", timeout=10) as resp:
        assert resp.status == 200
        health = json.load(resp)
    assert health["status"] == "ok"
    assert health["checks"]["dicom"]["ok"] is True
    assert health["node_id"] == "test-node"

    with urllib.request.urlopen(f"http://127.0.0.1:{node.console_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert "edge_instances 1.0" in metrics
    assert "edge_outbox_depth 1.0" in metrics
    assert 'edge_dicom_cstore_total{result="kept"} 1.0' in metrics

    assert node.stop() == 0  # Ctrl-C stops it cleanly
    assert "Traceback" not in node.log_text()
