"""With ``[console] tls_cert`` the console serves https only, so zeroconf announces it as ``_https._tcp``.

Before: it was announced as ``_http._tcp``, and a browser or an ops script following the
record spoke plain http to a TLS port.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edge.node.config import parse_config
from edge.ops.discovery import HTTP_TYPE, HTTPS_TYPE, service_infos
from tests.conftest import edge_cli, unique_node_id
from tests.console.conftest import QUIET

LOOPBACK_ZEROCONF = {"zeroconf": True, "zeroconf_interfaces": ["127.0.0.1"]}


def _console_record(tmp_path: Path, **console: str) -> Any:
    config = parse_config({"ops": {"zeroconf_interfaces": ["127.0.0.1"]}, "console": console}, tmp_path)
    return service_infos(config)["console"][0]


def test_the_console_record_type_follows_tls(tmp_path: Path) -> None:
    plain = _console_record(tmp_path)
    assert plain.type == HTTP_TYPE and plain.name.endswith("." + HTTP_TYPE)
    tls = _console_record(tmp_path, tls_cert="console.crt", tls_key="console.key")
    assert tls.type == HTTPS_TYPE and tls.name.endswith("." + HTTPS_TYPE)
    assert tls.properties[b"role"] == b"console"


def test_a_tls_node_is_found_on_the_lan_as_https(node_factory: Any) -> None:
    node_id = unique_node_id()
    node = node_factory(("run",), **QUIET, node={"id": node_id}, ops=LOOPBACK_ZEROCONF,
                        kiosk={"bind_address": "127.0.0.1"})
    made = edge_cli(node.config, "provision", "--console-tls", "--console-tls-host", "edge.clinic.lan")
    assert "set [console] tls_cert" in made.stdout
    node.start()
    deadline = time.monotonic() + 30  # mDNS announcements take a few rounds; poll edge discover
    while True:
        found = json.loads(edge_cli(node.config, "discover", "--json", "--timeout", "3").stdout)
        ours = [f for f in found if f["properties"].get("node_id") == node_id and f["properties"].get("role") == "console"]
        if ours or time.monotonic() > deadline:
            break
    assert [(f["type"], f["port"]) for f in ours] == [(HTTPS_TYPE, node.console_port)]  # never also as _http._tcp
    listing = edge_cli(node.config, "discover", "--timeout", "3").stdout
    assert any(line.startswith("HTTPS") and f"({node_id})" in line for line in listing.splitlines()), listing
