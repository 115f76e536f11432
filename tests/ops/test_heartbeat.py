"""The heartbeat against a real Pushgateway, /metrics parsed, the textfile, decommissioning."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.node.config import load_config
from edge.ops.heartbeat import Heartbeat
from edge.store.db import open_database
from tests.conftest import edge_cli, free_port, write_config
from tests.dicom_factory import make_dx
from tests.peers.pushgateway import Pushgateway

pytestmark = pytest.mark.skipif(not Path("/usr/bin/prometheus-pushgateway").exists(), reason="needs prometheus-pushgateway")


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[Pushgateway]:
    gateway = Pushgateway(tmp_path / "pushgateway").start()
    yield gateway
    gateway.stop()


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_node_heartbeat_reaches_pushgateway_and_survives_the_link_going_down(
    node_factory: Any, pushgateway: Pushgateway, tmp_path: Path
) -> None:
    textfile_dir = tmp_path / "textfile"
    node = node_factory(
        ("run",),
        ops={"pushgateway_url": pushgateway.url, "push_interval_s": 1.0, "push_timeout_s": 2.0, "textfile_dir": str(textfile_dir)},
        cloud={"dicomweb_url": f"http://127.0.0.1:{free_port()}/dicom-web", "connect_timeout_s": 1.0},
        sync={"retry_min_s": 0.5, "retry_max_s": 1.0, "poll_interval_s": 0.5, "compress": "none"},
        reports={"enabled": False},
    ).start()

    # The group is the node id; the node's identity, health and queue are in it.
    assert pushgateway.wait_for("edge_healthy", "test-node", expect=1.0) == 1.0
    samples = pushgateway.samples("test-node")
    names = {s.name for s in samples}
    assert {"edge_outbox_depth", "edge_outbox_oldest_age_seconds", "edge_disk_free_bytes", "edge_node_info",
            "edge_node_start_time_seconds", "edge_health_check_ok", "push_time_seconds"} <= names
    assert all(s.labels["job"] == "clinic_edge" for s in samples)
    assert pushgateway.value("edge_health_check_ok", "test-node", check="dicom") == 1.0
    assert pushgateway.value("edge_outbox_depth", "test-node") == 0.0

    # The same figures as a node_exporter textfile, written whole (no temp file left behind).
    prom = textfile_dir / "clinic_edge.prom"
    assert prom.exists()
    assert "edge_outbox_depth" in _families(prom.read_text())
    assert [p.name for p in textfile_dir.iterdir()] == ["clinic_edge.prom"]

    # The uplink (and central monitoring with it) goes away; the clinic keeps working.
    pushgateway.stop()
    image = make_dx(tmp_path / "dx.dcm", rows=64, cols=64)
    assert node.storescu(tmp_path / "dx.dcm").returncode == 0
    time.sleep(3.0)  # several missed heartbeats
    pushgateway.start()  # empty: it lost everything

    # The first push after the link returns carries the latest state, not a backlog.
    assert pushgateway.wait_for("edge_outbox_depth", "test-node", expect=1.0) == 1.0
    assert pushgateway.wait_for("edge_instances", "test-node", expect=1.0) == 1.0
    log = node.log_text()
    assert log.count("heartbeat: push to") == 1, log  # one line when it broke, not one per attempt
    assert log.count("heartbeat: pushing to") == 2  # ...and one when it came back

    # /metrics on the node gives the same picture locally, in valid exposition format.
    with urllib.request.urlopen(f"http://127.0.0.1:{node.console_port}/metrics", timeout=5) as resp:
        local = _families(resp.read().decode())
    for name in ("edge_dicom_cstore", "edge_dicom_received_bytes", "edge_dicom_associations_open", "edge_outbox_depth",
                 "edge_outbox_oldest_age_seconds", "edge_sync_upload_bytes", "edge_sync_failures", "edge_reports_pulled",
                 "edge_disk_free_bytes", "edge_node_info", "edge_node_start_time_seconds", "edge_health_check_ok", "edge_healthy"):
        assert name in local, name
    received = [s for s in local["edge_dicom_received_bytes"].samples if s.name.endswith("_total")]
    assert received[0].value >= image.Rows * image.Columns * 2  # the pixel data alone
    kept = [s for s in local["edge_dicom_cstore"].samples if s.labels.get("result") == "kept" and s.name.endswith("_total")]
    assert kept[0].value == 1
    info = local["edge_node_info"].samples[0].labels
    assert info["node_id"] == "test-node" and info["version"]
    start = local["edge_node_start_time_seconds"].samples[0].value
    assert time.time() - 120 < start <= time.time()

    # Decommissioning: the node's group disappears from central monitoring.
    assert node.stop() == 0
    result = edge_cli(node.config, "decommission")
    assert "deleted node_id=test-node" in result.stdout
    assert pushgateway.samples("test-node") == []
    assert not prom.exists()


def _tls_gateway(tmp_path: Path) -> tuple[Pushgateway, Path]:
    """A Pushgateway that wants TLS and basic auth (user edge, password s3cret)."""
    import bcrypt

    certs = tmp_path / "tls"
    certs.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(certs / "key.pem"), "-out", str(certs / "cert.pem"), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    web = certs / "web.yml"
    web.write_text(
        f"tls_server_config:\n  cert_file: {certs / 'cert.pem'}\n  key_file: {certs / 'key.pem'}\n"
        f"basic_auth_users:\n  edge: '{hashed}'\n"
    )
    gateway = Pushgateway(tmp_path / "pushgateway", web_config=web, ca_file=certs / "cert.pem", auth=("edge", "s3cret"))
    return gateway.start(), certs / "cert.pem"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_heartbeat_authenticates_over_tls_and_a_refusal_is_only_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gateway, ca = _tls_gateway(tmp_path)
    try:
        secrets = tmp_path / "push-secrets.toml"
        secrets.write_text('username = "edge"\npassword = "s3cret"\n')
        secrets.chmod(0o600)
        path = write_config(tmp_path / "edge.toml", tmp_path / "var", ops={
            "pushgateway_url": gateway.url, "pushgateway_secrets_file": str(secrets),
            "pushgateway_ca_bundle": str(ca), "push_timeout_s": 5.0,
        })
        config = load_config(path)
        open_database(config.data_dir)
        asyncio.run(Heartbeat(config).beat())
        assert gateway.value("edge_outbox_depth", "test-node") == 0.0

        # Wrong password: the Pushgateway says 401, the heartbeat logs it and carries on.
        secrets.write_text('username = "edge"\npassword = "wrong"\n')
        heartbeat = Heartbeat(config)
        asyncio.run(heartbeat.beat())
        assert any("401" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]

        # A secrets file others can read is refused before anything is sent.
        secrets.chmod(0o644)
        result = edge_cli(path, "doctor", "--json", check=False)
        heartbeat_item = next(i for i in json.loads(result.stdout) if i["name"] == "heartbeat")
        assert heartbeat_item["verdict"] == "fail" and "pushgateway_secrets_file" in heartbeat_item["detail"]
    finally:
        gateway.stop()
