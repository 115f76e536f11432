"""``edge provision --console-tls`` through an image's boot partition: the key is made on the node, at first boot."""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509

from edge.node.config import load_config
from tests.conftest import edge_cli


def test_the_boot_file_asks_for_a_certificate_and_first_boot_makes_it_on_the_node(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    edge_cli(tmp_path / "absent.toml", "provision", "--image-boot", str(boot), "--node-id", "clinic-0007",
             "--console-tls-host", "reception-edge")
    written = (boot / "edge-provision.toml").read_text()
    assert "[console_tls]" in written and "reception-edge" in written and "PRIVATE KEY" not in written

    node_dir = tmp_path / "node"
    node_dir.mkdir()
    config_path = node_dir / "edge.toml"
    config_path.write_text((Path(__file__).resolve().parents[2] / "edge.toml").read_text())
    result = edge_cli(config_path, "provision", "--from-file", str(boot / "edge-provision.toml"))
    assert "set [console] tls_cert" in result.stdout
    config = load_config(config_path)
    cert, key = config.path(config.console.tls_cert), config.path(config.console.tls_key)
    assert cert == node_dir / "console-tls.crt" and key == node_dir / "console-tls.key"
    assert (key.stat().st_mode & 0o777) == 0o600
    names = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    assert {"reception-edge", "clinic-0007.local", "localhost"} <= set(dns)
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)  # a usable pair
    text = config_path.read_text()
    assert 'tls_cert = "console-tls.crt"' in text and "# PEM certificate" in text  # comments kept
