"""``edge doctor`` against real peers (DCMTK storescp as the DR, Orthanc as the cloud) and ``edge provision``."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.node.config import load_config
from edge.ops.doctor import check_printer
from tests.conftest import DCMTK, edge_cli, free_port, unique_node_id, wait_for_port, write_config
from tests.peers.orthanc import OrthancPeer, start_orthanc


@pytest.fixture
def dr(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """DCMTK storescp standing in for the X-ray's Verification SCP (it answers C-ECHO)."""
    port = free_port()
    out = tmp_path / "dr"
    out.mkdir()
    proc = subprocess.Popen([str(DCMTK / "storescp"), "-aet", "DR1", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc=proc)
    yield proc, port
    proc.kill()
    proc.wait(10)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    peer = start_orthanc(tmp_path)
    yield peer
    peer.kill()


def _doctor(config: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    result = edge_cli(config, "doctor", "--json", check=False)
    return result.returncode, {item["name"]: item for item in json.loads(result.stdout)}


def test_doctor_passes_on_a_healthy_node_then_names_each_missing_part_with_a_fix(
    node_factory: Any, dr: tuple[subprocess.Popen[bytes], int], orthanc: OrthancPeer, tmp_path: Path
) -> None:
    printer_dir = tmp_path / "usb"
    printer_dir.mkdir()
    node = node_factory(
        ("run",),
        node={"id": unique_node_id()},  # zeroconf is on: no other node on the machine may answer for it
        dicom={"modality_ae": "DR1", "modality_host": "127.0.0.1", "modality_port": dr[1]},
        cloud={"dicomweb_url": orthanc.dicomweb_url, "connect_timeout_s": 2.0, "read_timeout_s": 5.0},
        ops={"zeroconf": True},  # on loopback (conftest)
        reports={"enabled": False},
        kiosk={"printer": "escpos", "escpos_device": str(printer_dir / "lp0")},  # a receipt printer "device" that is a file
    ).start()
    node.wait_for_log("zeroconf: announcing")

    code, items = _doctor(node.config)
    failing = {name: item for name, item in items.items() if item["verdict"] == "fail"}
    assert code == 0 and failing == {}, failing
    for name in ("config", "disk", "services", "dr", "cloud", "zeroconf"):
        assert items[name]["verdict"] == "pass", items[name]
    assert "C-ECHO" in items["dr"]["detail"]
    assert "QIDO-RS" in items["cloud"]["detail"]
    assert items["clock"]["verdict"] in ("pass", "warn")  # no timesyncd/chrony in this container: "unknown"
    assert items["printer"]["verdict"] == "pass", items["printer"]
    assert items["boxes"]["verdict"] == "skip"  # no ECG box here
    assert items["tpm"]["verdict"] == "skip"  # data not on the appliance's LUKS partition
    assert items["worklist"]["verdict"] == "pass" and items["worklist"]["detail"] == "answers only DR1@127.0.0.1; today"
    # C-STORE open to any AE title (a first run works): a warning with the fix, not a failure.
    assert items["c-store"]["verdict"] == "warn" and 'allowed_calling_aets = ["DR1"]' in items["c-store"]["hint"]

    # The human view: one line per item and a closing count.
    text = edge_cli(node.config, "doctor").stdout
    assert text.splitlines()[0].startswith("PASS  config")
    assert "0 failed" in text

    # The DR switched off, the cloud gone, the printer unplugged: each a FAIL with a fix, and a non-zero exit.
    dr[0].kill()
    dr[0].wait(10)
    orthanc.stop()
    printer_dir.rmdir()
    code, items = _doctor(node.config)
    assert code == 1
    assert items["dr"]["verdict"] == "fail" and "modality_host" in items["dr"]["hint"]
    assert items["cloud"]["verdict"] == "fail" and "uplink" in items["cloud"]["hint"]
    assert items["printer"]["verdict"] == "fail" and "USB cable" in items["printer"]["hint"]
    assert items["services"]["verdict"] == "pass"
    text = edge_cli(node.config, "doctor", check=False).stdout
    assert "FAIL  dr" in text and "FAIL  cloud" in text and "FAIL  printer" in text and text.count("fix: ") >= 3

    # The node itself stopped: services and zeroconf fail too.
    node.stop()
    code, items = _doctor(node.config)
    assert items["services"]["verdict"] == "fail" and "systemctl start edge.target" in items["services"]["hint"]
    assert items["zeroconf"]["verdict"] == "fail"


def test_doctor_reports_a_wrong_token(node_factory: Any, orthanc: OrthancPeer, tmp_path: Path) -> None:
    """Orthanc with authentication on: a token it does not know is a credentials problem, said so."""
    secured = OrthancPeer(tmp_path / "secured", extra_config={
        "AuthenticationEnabled": True, "RegisteredUsers": {"edge": "right"}}).start()
    try:
        secrets = tmp_path / "secrets.toml"
        secrets.write_text('username = "edge"\npassword = "wrong"\n')
        secrets.chmod(0o600)
        node = node_factory(cloud={"dicomweb_url": secured.dicomweb_url, "secrets_file": str(secrets)})
        code, items = _doctor(node.config)
        assert code == 1
        assert items["cloud"]["verdict"] == "fail" and "401" in items["cloud"]["detail"]
        assert "edge provision --token" in items["cloud"]["hint"]
        assert items["dr"]["verdict"] == "skip"  # no DR configured: skipped, not failed
        # ... and the worklist closed: a warning saying how to open it.
        assert items["worklist"]["verdict"] == "warn" and items["worklist"]["detail"].startswith("closed")
        assert "modality_host" in items["worklist"]["hint"] and "other_modalities" in items["worklist"]["hint"]
    finally:
        secured.kill()


def test_a_missing_cups_queue_is_reported_with_a_fix(tmp_path: Path) -> None:
    """Whatever this machine's CUPS does, a FAIL naming the queue and a fix for the real cause
    (tests/kiosk/test_printer_state.py tells each cause apart against a private cupsd)."""
    path = write_config(tmp_path / "edge.toml", tmp_path / "var", kiosk={"printer": "cups", "cups_queue": "edge-test-no-such-queue"})
    item = check_printer(load_config(path), require_kiosk=False)
    assert item.verdict == "fail" and "edge-test-no-such-queue" in item.detail
    assert ("lpadmin" in item.hint and "does not exist" in item.detail
            or "systemctl start cups" in item.hint and "CUPS scheduler is not running" in item.detail)


def test_provision_writes_identity_keeps_comments_and_locks_the_token(tmp_path: Path) -> None:
    config_path = tmp_path / "edge.toml"
    config_path.write_text((Path(__file__).resolve().parents[2] / "edge.toml").read_text())
    result = edge_cli(config_path, "provision", "--node-id", "clinic-0042", "--name", "Gugulethu Day Clinic",
                      "--ae-title", "GUGU_EDGE", "--modality-host", "192.0.2.10", "--modality-port", "104",
                      "--cloud-url", "https://pacs.example.org/dicom-web", "--token", "t0ken")
    assert "set [node] id" in result.stdout
    config = load_config(config_path)
    assert (config.node.id, config.dicom.ae_title, config.dicom.modality_host) == ("clinic-0042", "GUGU_EDGE", "192.0.2.10")
    text = config_path.read_text()
    assert "# unique per node, set at provisioning" in text  # comments kept
    assert "t0ken" not in text
    secrets = config.path(config.cloud.secrets_file)
    assert secrets is not None and (secrets.stat().st_mode & 0o777) == 0o600
    assert 'token = "t0ken"' in secrets.read_text()

    # Running it again changes nothing; a bad value is refused and nothing is written.
    assert "nothing changed" in edge_cli(config_path, "provision", "--node-id", "clinic-0042").stdout
    before = config_path.read_text()
    bad = edge_cli(config_path, "provision", "--node-id", "Clinic 42!", check=False)
    assert bad.returncode == 2 and "[node] id" in bad.stderr
    assert config_path.read_text() == before


def test_provision_onto_an_image_boot_partition(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    result = edge_cli(tmp_path / "absent.toml", "provision", "--image-boot", str(boot), "--node-id", "clinic-0007",
                      "--cloud-url", "https://pacs.example.org/dicom-web", "--token", "t0ken")
    assert "edge-provision.toml" in result.stdout
    written = (boot / "edge-provision.toml").read_text()
    assert 'id = "clinic-0007"' in written and 'token = "t0ken"' in written


def test_doctor_names_every_modality_the_worklist_answers_and_the_closed_c_store(tmp_path: Path) -> None:
    path = write_config(tmp_path / "edge.toml", tmp_path / "var",  # loopback only: nothing answers the DR's C-ECHO
                        dicom={"modality_ae": "DR", "modality_host": "127.0.0.2", "modality_port": free_port(),
                               "other_modalities": ["CR1@127.0.0.3"], "worklist_days_back": 1, "worklist_days_ahead": 2,
                               "allowed_calling_aets": ["DR", "CR1"]})
    text = edge_cli(path, "doctor", check=False).stdout
    assert "PASS  worklist    answers only DR@127.0.0.2, CR1@127.0.0.3; today -1/+2 days" in text, text
    assert "PASS  c-store     only DR, CR1 may store images" in text, text
