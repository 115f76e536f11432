"""A real Prometheus Pushgateway (Debian ``prometheus-pushgateway``) on loopback, for heartbeat tests.

No persistence file: a restart starts empty, which is exactly "central monitoring lost
everything while the link was down". ``stop()`` / ``start()`` keep the port. With
``web_config`` it serves TLS and basic auth (exporter-toolkit's web config file).
"""

from __future__ import annotations

import atexit
import base64
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import free_port
from tests.peers.orthanc import _die_with_parent

PUSHGATEWAY = Path("/usr/bin/prometheus-pushgateway")


class Pushgateway:
    def __init__(self, workdir: Path, web_config: Path | None = None, ca_file: Path | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.web_config = web_config
        self.ca_file = ca_file
        self.auth = auth
        self.log_path = workdir / "pushgateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.kill)

    @property
    def url(self) -> str:
        return f"{'https' if self.web_config else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> Pushgateway:
        argv = [str(PUSHGATEWAY), f"--web.listen-address=127.0.0.1:{self.port}", "--persistence.file=",
                "--log.level=warn"]
        if self.web_config:
            argv.append(f"--web.config.file={self.web_config}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pushgateway exited: {self.log_path.read_text()[-2000:]}")
            try:
                self.get("/-/ready")
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("pushgateway did not get ready")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    kill = stop

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(self.url + path)
        if self.auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(":".join(self.auth).encode()).decode())
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
        with opener.open(request, timeout=5) as response:
            return bytes(response.read())

    def samples(self, node_id: str | None = None) -> list[Sample]:
        """Every sample the Pushgateway exposes (its /metrics), optionally only one node's group."""
        text = self.get("/metrics").decode()
        found = [s for family in text_string_to_metric_families(text) for s in family.samples]
        return [s for s in found if node_id is None or s.labels.get("node_id") == node_id]

    def value(self, name: str, node_id: str, **labels: str) -> float | None:
        for sample in self.samples(node_id):
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        return None

    def wait_for(self, name: str, node_id: str, expect: float | None = None, timeout: float = 20.0, **labels: str) -> float:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.value(name, node_id, **labels)
            except (OSError, urllib.error.URLError):
                value = None
            if value is not None and (expect is None or value == expect):
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{name}{labels} for {node_id} is {value}, wanted {expect}")
