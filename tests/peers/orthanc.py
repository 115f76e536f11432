"""A real Orthanc with its DICOMweb plugin, standing in for the regional cloud PACS in tests.

Debian's packages (``orthanc`` 1.10.x, ``orthanc-dicomweb`` 1.7) on loopback in
the root network namespace, so both the test process and a node process it starts
can reach it. Orthanc binds every interface, hence ``RemoteAccessAllowed`` false
(only loopback clients are answered) and the DICOM port off unless asked for.

``stop()`` / ``start()`` keep the storage directory and the ports, so a test can
take the cloud down and bring it back with everything it had.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.node import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB_ROOT = "/dicom-web/"

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Orthanc gets SIGKILL if the test process dies without cleaning up (pytest-timeout, kill -9).

    Linux ties this to the thread that started the child: start Orthanc from the main
    thread (or another that lives as long as it should).
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class OrthancPeer:
    """One Orthanc process with its own config, storage and log under ``workdir``.

    Use as a context manager, or call ``start()`` and ``stop()``; a process left
    running is killed at interpreter exit.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        dicom: bool = False,
        aet: str = "CLOUD",
        extra_config: dict[str, Any] | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.dicom_enabled = dicom
        self.aet = aet
        self.extra_config = extra_config or {}
        self.startup_timeout = startup_timeout
        self.http_port = free_port()
        self.dicom_port: int | None = free_port() if dicom else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._ever_started = False
        atexit.register(self.kill)

    # ------------------------------------------------------------ addresses

    @property
    def base_url(self) -> str:
        """Orthanc's REST API, e.g. ``http://127.0.0.1:8042``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root to put in ``[cloud] dicomweb_url`` (no trailing slash)."""
        return self.base_url + DICOMWEB_ROOT.rstrip("/")

    # ------------------------------------------------------------ lifecycle

    def config(self) -> dict[str, Any]:
        """The configuration this peer runs with (extra_config merged over it)."""
        cfg: dict[str, Any] = {
            "Name": "edge-test-cloud",
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": self.dicom_enabled,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port or 4242,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "SaveJobs": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {
                "Enable": True,
                "Root": DICOMWEB_ROOT,
                "EnableWado": False,
                "Host": f"127.0.0.1:{self.http_port}",  # RetrieveURLs in answers point back here
                "Ssl": False,
            },
        }
        for key, value in self.extra_config.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        return cfg

    def start(self) -> OrthancPeer:
        """Start (or restart) Orthanc and wait until its REST API answers."""
        if self.is_running():
            return self
        attempts = 1 if self._ever_started else 3  # a restart must keep its port
        for attempt in range(attempts):
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            log = open(self.log_path, "ab")
            try:
                self.proc = subprocess.Popen(
                    [str(ORTHANC), str(self.config_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.workdir,
                    preexec_fn=_die_with_parent,
                )
            finally:
                log.close()
            try:
                self._wait_ready()
            except RuntimeError:
                if attempt + 1 < attempts and "port" in self.log_tail().lower():
                    self.http_port = free_port()  # lost a race for the port: take another
                    if self.dicom_enabled:
                        self.dicom_port = free_port()
                    continue
                raise
            self._ever_started = True
            return self
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.proc.returncode} during start-up:\n{self.log_tail()}"
                )
            try:
                system = self.get("/system", timeout=1.0)
                if system.get("HttpPort") == self.http_port:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"Orthanc did not answer within {self.startup_timeout}s:\n{self.log_tail()}")

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Shut Orthanc down cleanly (SIGTERM), as when the cloud goes away; SIGKILL if it lingers."""
        if not self.is_running():
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the cloud vanishing mid-request; also the last-resort clean-up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> OrthancPeer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        atexit.unregister(self.kill)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------ REST helpers

    def _request(
        self, method: str, path: str, body: bytes | None = None,
        content_type: str | None = None, timeout: float = 10.0,
    ) -> Any:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        users = self.extra_config.get("RegisteredUsers") if self.extra_config.get("AuthenticationEnabled") else None
        if users:  # the test itself uses the first registered user
            user, password = next(iter(users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        # Never through a proxy: this is loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def get(self, path: str, timeout: float = 10.0) -> Any:
        """GET a REST path (``/system``, ``/statistics``, …) as parsed JSON."""
        return self._request("GET", path, timeout=timeout)

    def instance_count(self) -> int:
        """Instances Orthanc holds: the "none lost, none duplicated" count."""
        return int(self.get("/statistics")["CountInstances"])

    def study_instance_uids(self) -> set[str]:
        """StudyInstanceUIDs of every study Orthanc holds."""
        return {s["MainDicomTags"]["StudyInstanceUID"] for s in self.get("/studies?expand")}

    def sop_instance_uids(self) -> list[str]:
        """SOPInstanceUIDs of every instance Orthanc holds (a list: duplicates would show)."""
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand")]

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a Part 10 file through the REST API (POST /instances), as a reader's PACS would.

        Returns Orthanc's answer; its ``Status`` is ``Success`` or ``AlreadyStored``.
        """
        answer = self._request("POST", "/instances", Path(path).read_bytes(), "application/dicom")
        return dict(answer)

    def delete_all(self) -> None:
        """Empty the cloud, keeping the process running."""
        for patient in self.get("/patients"):
            self._request("DELETE", f"/patients/{patient}")


def start_orthanc(tmp_path: Path, **kwargs: Any) -> OrthancPeer:
    """A started peer under ``tmp_path/orthanc``; the caller stops it (e.g. a fixture's teardown).

    Keyword arguments go to :class:`OrthancPeer` (``dicom=True``, ``extra_config=…``).
    """
    return OrthancPeer(Path(tmp_path) / "orthanc", **kwargs).start()
