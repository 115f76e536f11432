"""Zeroconf on loopback: a real browser sees the node's records, and they go when it stops."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import pytest
from zeroconf import (
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from edge.ops.discovery import DICOM_TYPE, HTTP_TYPE
from tests.conftest import edge_cli, unique_node_id

LOOPBACK_ZEROCONF = {"zeroconf": True, "zeroconf_interfaces": ["127.0.0.1"]}


class Watcher:
    """A browser in the test process, on loopback only; remembers adds and removes."""

    def __init__(self) -> None:
        self.zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        self.events: list[tuple[str, str, ServiceStateChange]] = []
        self._lock = threading.Lock()
        self.browser = ServiceBrowser(self.zc, [DICOM_TYPE, HTTP_TYPE], handlers=[self._on])

    def _on(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        with self._lock:
            self.events.append((service_type, name, state_change))

    def wait(self, service_type: str, change: ServiceStateChange, node_id: str, timeout: float = 15.0) -> str:
        """This node's record only: another node on the machine (a parallel test run) may announce too."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for t, name, c in self.events:
                    if t == service_type and c is change and f"({node_id})" in name:
                        return name
            time.sleep(0.05)
        raise TimeoutError(f"no {change} for {service_type}: {self.events}")

    def close(self) -> None:
        self.browser.cancel()
        self.zc.close()


def test_node_announces_dicom_with_its_aet_and_withdraws_at_shutdown(node_factory: Any) -> None:
    watcher = Watcher()
    node_id = unique_node_id()
    try:
        node = node_factory(("run",), node={"id": node_id}, ops=LOOPBACK_ZEROCONF, dicom={"ae_title": "EDGE_ZC"},
                            reports={"enabled": False}).start()
        name = watcher.wait(DICOM_TYPE, ServiceStateChange.Added, node_id)
        info = ServiceInfo(DICOM_TYPE, name)
        assert info.request(watcher.zc, 3000)
        assert info.properties[b"aet"] == b"EDGE_ZC"
        assert info.properties[b"node_id"] == node_id.encode()
        assert info.port == node.port
        assert "127.0.0.1" in info.parsed_addresses()
        http = watcher.wait(HTTP_TYPE, ServiceStateChange.Added, node_id)
        http_info = ServiceInfo(HTTP_TYPE, http)
        assert http_info.request(watcher.zc, 3000) and http_info.port == node.console_port

        # `edge discover` (another process) finds it too.
        found = json.loads(edge_cli(node.config, "discover", "--json", "--timeout", "4").stdout)
        dicom = [f for f in found if f["type"] == DICOM_TYPE and f["properties"].get("node_id") == node_id]
        assert dicom and dicom[0]["properties"]["aet"] == "EDGE_ZC" and dicom[0]["port"] == node.port

        assert node.stop() == 0
        assert watcher.wait(DICOM_TYPE, ServiceStateChange.Removed, node_id) == name  # goodbye packet, not a TTL expiry
        assert watcher.wait(HTTP_TYPE, ServiceStateChange.Removed, node_id) == http
        assert "zeroconf: withdrew 2 record(s)" in node.log_text()
    finally:
        watcher.close()


def test_a_service_that_is_down_is_not_announced(node_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`edge serve ops` alone: neither the DICOM service nor the console runs, so nothing is announced.
    Whether DICOM runs is read from its report, not by connecting: a probe every refresh took a DR slot."""
    from edge.node.config import load_config
    from edge.ops.discovery import Announcer

    node = node_factory(("serve", "dicom"), ops=LOOPBACK_ZEROCONF)
    config = load_config(node.config)
    dialled: list[int] = []
    connect = socket.socket.connect

    def recording_connect(self: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and len(address) >= 2:
            dialled.append(int(address[1]))
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)

    async def announced() -> set[str]:
        announcer = Announcer(config)
        await announcer.start()
        try:
            return announcer.announced
        finally:
            await announcer.stop()

    assert asyncio.run(announced()) == set()
    node.start()
    node.wait_for_log(f"edge.dicom.service: {node.ae_title} listening")  # its first report is written just before
    dialled.clear()  # starting the node waited for its port: only the announcer's own connections count
    assert asyncio.run(announced()) == {"dicom"}
    assert node.port not in dialled, "the announcer connected to the DICOM port"
    assert config.console.port in dialled  # the console is still found by its port
