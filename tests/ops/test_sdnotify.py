"""systemd's notify protocol: a node under Type=notify says READY=1, then feeds the watchdog."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest


def _receive_until(sock: socket.socket, wanted: str, timeout: float = 20.0) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if any(wanted in m.split("\n") for m in messages):
            return messages
    raise TimeoutError(f"no {wanted} in {messages}")


def test_node_sends_ready_then_watchdog_then_stopping(node_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "400000")  # WatchdogSec=0.4s: pings every 0.2s
        node = node_factory(("serve", "dicom")).start()
        messages = _receive_until(sock, "READY=1")
        assert any(m.startswith("READY=1") and "STATUS=up: dicom" in m for m in messages)
        pings = [m for m in _receive_until(sock, "WATCHDOG=1") if m == "WATCHDOG=1"]
        time.sleep(1.0)
        sock.settimeout(1.0)
        later = [sock.recv(4096).decode() for _ in range(3)]
        assert pings and later.count("WATCHDOG=1") == 3  # keeps coming
        assert node.stop() == 0
        assert "STOPPING=1" in _receive_until(sock, "STOPPING=1")


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge import sdnotify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # the watchdog is meant for another process
    assert sdnotify.watchdog_interval_s() is None
