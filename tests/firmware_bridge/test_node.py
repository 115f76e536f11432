"""The bridge inside the real node: a box's ECG reaches the cloud PACS; edge status shows the box."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware_bridge.config import BridgeSection
from firmware_bridge.const import TWELVE_LEAD_ECG_SOP_CLASS
from tests.conftest import REPO, edge_cli
from tests.peers.orthanc import OrthancPeer, start_orthanc
from tests.waiting import wait_until


def test_every_bridge_key_is_in_the_shipped_edge_toml_with_a_comment() -> None:
    text = (REPO / "edge.toml").read_text()
    shipped = tomllib.loads(text)["bridge"]
    assert set(shipped) == set(BridgeSection.model_fields)
    assert BridgeSection.model_validate(shipped) == BridgeSection()  # shipped values are the defaults
    section = text.split("[bridge]", 1)[1].split("\n[", 1)[0]
    for key in BridgeSection.model_fields:
        assert re.search(rf"^{key} = .+# \S", section, re.MULTILINE), f"[bridge] {key} has no comment"


def test_a_bad_bridge_key_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('[bridge]\nbaud = "fast"\n')
    result = edge_cli(config, "serve", "bridge", check=False)
    assert result.returncode == 2 and "[bridge] baud" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    peer = start_orthanc(tmp_path)
    yield peer
    peer.kill()


@pytest.mark.slow
def test_box_recording_reaches_the_cloud_as_a_12_lead_ecg(node_factory: Any, orthanc: OrthancPeer, tmp_path: Path) -> None:
    link = tmp_path / "usb-ClinicEdge_ECG8_E2E-if00"
    node = node_factory(
        ("run",), bridge={"ports": [str(link)], "port_glob": "", "reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
        cloud={"dicomweb_url": orthanc.dicomweb_url}, sync={"compress": "none", "poll_interval_s": 0.5},
        reports={"enabled": False}, ops={"zeroconf": False},
    ).start()
    armed = edge_cli(node.config, "ecg-arm", "ECG-E2E", "--patient-id", "PID-9", "--patient-name", "MOLEFE^LERATO",
                     "--accession", "ACC-E2E")
    assert "armed" in armed.stdout
    sim = subprocess.Popen(
        [sys.executable, "-m", "edge", "ecg-sim", str(link), "--pty", "--box-id", "ECG-E2E", "--record-every", "2",
         "--seconds", "10", "--speed", "5", "--recordings", "1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = sim.communicate(timeout=40)
    finally:
        sim.kill()
    assert sim.returncode == 0, err
    assert json.loads(out)["recordings_acked"] == 1

    def in_cloud() -> list[dict[str, Any]]:
        return orthanc.get("/instances?expand")
    [instance] = wait_until(in_cloud, 30, "the ECG in Orthanc", every=0.25)
    tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
    assert tags["SOPClassUID"] == TWELVE_LEAD_ECG_SOP_CLASS and tags["Modality"] == "ECG"
    assert (tags["PatientID"], tags["AccessionNumber"]) == ("PID-9", "ACC-E2E")
    qido = orthanc.get(f"/dicom-web/instances?SOPInstanceUID={tags['SOPInstanceUID']}&includefield=00080016")
    assert qido[0]["00080016"]["Value"] == [TWELVE_LEAD_ECG_SOP_CLASS]  # the DICOMweb answer a reader gets

    [study] = wait_until(lambda: [s for s in node.studies() if s["sync_state"] == "synced"], 20, "study synced", every=0.25)
    assert study["accession_number"] == "ACC-E2E" and "ECG" in study["modalities"]
    [box] = node.status()["boxes"]
    assert box["box_id"] == "ECG-E2E" and box["firmware"] == "1.0.0" and box["battery_pct"] == 87
    human = edge_cli(node.config, "status").stdout
    assert "ecg box   ECG-E2E: firmware 1.0.0, battery 87%" in human
    assert "MOLEFE" not in node.log_text()  # no patient names in the log
