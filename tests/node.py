"""The node as a process, for the tests and the benchmarks: free ports, its config, its CLI, EdgeNode.

It imports no pytest, so bench/ runs these same helpers from the run-only venv
(``scripts/venv.sh`` without ``test``); tests/conftest.py makes the fixtures from them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# DCMTK's tools, by full path: pynetdicom installs apps with the same names on PATH.
DCMTK = Path("/usr/bin")
# Debian's Chromium for the kiosk and console pages; no browser download is possible here.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


_PORT_BLOCK = 2000
_PORTS_FIRST = 12000
"""Below the kernel's ephemeral range (32768-60999): no outgoing connection's own port lands here."""
_next_port = 0


def free_port() -> int:
    """A port free now and never handed out twice in this run, in this worker's own block.

    ``bind(0)`` hands every process ports from the one ephemeral range, so a port one xdist
    worker freed (a peer between restarts) could be given to another worker's listener; each
    worker (``PYTEST_XDIST_WORKER`` gwN) has a block of its own instead.
    """
    global _next_port
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    block = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    first = _PORTS_FIRST + (block % 10) * _PORT_BLOCK
    for _ in range(_PORT_BLOCK):
        port = first + _next_port % _PORT_BLOCK
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + _PORT_BLOCK - 1}")


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def unique_node_id() -> str:
    """For tests with zeroconf on: multicast reaches every process on the machine, so a node id no other run uses."""
    return f"zc-{uuid.uuid4().hex[:8]}"


def write_config(path: Path, data_dir: Path, **sections: dict[str, Any]) -> Path:
    """An edge.toml for a test node: its own data dir and free ports."""
    base: dict[str, dict[str, Any]] = {
        "node": {"id": "test-node"},
        "dicom": {"ae_title": "EDGE", "port": free_port(), "bind_address": "127.0.0.1"},
        "storage": {"data_dir": str(data_dir), "min_free_mb": 0},
        "console": {"port": free_port(), "bind_address": "127.0.0.1"},
        "kiosk": {"port": free_port()},
        # Tests talk to loopback only: no mDNS on the machine's real interfaces.
        "ops": {"zeroconf": False, "zeroconf_interfaces": ["127.0.0.1"]},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def edge_cli(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


class EdgeNode:
    """A real node process (``edge serve dicom`` or ``edge run``) on its own ports."""

    def __init__(self, tmp: Path, command: tuple[str, ...] = ("serve", "dicom"), **sections: dict[str, Any]) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "var"
        self.config = write_config(tmp / "edge.toml", self.data_dir, **sections)
        import tomllib

        parsed = tomllib.loads(self.config.read_text())
        self.port = int(parsed["dicom"]["port"])
        self.console_port = int(parsed["console"]["port"])
        self.ae_title = parsed["dicom"]["ae_title"]
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "node.log"

    def start(self) -> EdgeNode:
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "--config", str(self.config), *self.command],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.tmp,
        )
        if self.command == ("serve", "sync"):
            self.wait_for_log("sync: uploading to")
            return self
        wait_for_port(self.port, timeout=60.0, proc=self.proc)  # generous: a busy 2-core box running the suite on 3 workers
        if "run" in self.command or "console" in self.command:
            wait_for_port(self.console_port, timeout=60.0, proc=self.proc)
        return self

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        """Until the node's log says ``text`` (services without a port of their own)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text()[self._log_offset :]:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log_text()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"node did not log {text!r} within {timeout}s:\n{self.log_text()[-2000:]}")

    def kill(self) -> None:
        """A power cut, as far as the process can tell."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        return self.proc.returncode if self.proc else 0

    def studies(self) -> list[dict[str, Any]]:
        return json.loads(edge_cli(self.config, "studies", "--json").stdout)

    def status(self) -> dict[str, Any]:
        return json.loads(edge_cli(self.config, "status", "--json").stdout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def storescu(self, *files: Path, calling: str = "DR1", called: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """DCMTK storescu against this node; returns its verbose output."""
        return subprocess.run(
            [str(DCMTK / "storescu"), "-v", "-aet", calling, "-aec", called or self.ae_title, *extra,
             "127.0.0.1", str(self.port), *map(str, files)],
            capture_output=True,
            text=True,
            timeout=120,
        )
