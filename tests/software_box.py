"""Software ECG boxes (``edge ecg-sim --pty``) as separate processes, for tests of the whole node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class SoftwareBoxes:
    """Boxes plugged in on pty links; every one still running is switched off at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def plug_in(self, link: Path, box_id: str, *flags: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "ecg-sim", str(link), "--pty", "--box-id", box_id, "--json", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.procs.append(proc)
        return proc

    def unplug(self, proc: subprocess.Popen[str], link: Path | None = None) -> None:
        """SIGTERM: the box stops and its port (the link) goes away, as when the cable is pulled."""
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        if link is not None:
            assert not link.exists()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate(timeout=10)
