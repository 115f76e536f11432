"""A private CUPS for the tests: its own cupsd on a loopback port, a cups-pdf queue, a paper-out queue.

cupsd runs in the foreground with its own cupsd.conf and cups-files.conf (all state under
the test's folder). cups-pdf reads its settings only from /etc/cups: a queue with device
URI ``cups-pdf:/NAME`` reads /etc/cups/cups-pdf-NAME.conf, so each peer writes one such
file with a unique NAME (output into the test's folder) and removes it when stopped.
A private ServerBin mirrors /usr/lib/cups and adds a ``paperout`` backend that reports
``media-empty-error`` the way a real printer's backend does.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.node import free_port, wait_for_port

CUPS_LIB = Path("/usr/lib/cups")
PPD = Path("/usr/share/ppd/cups-pdf/CUPS-PDF_noopt.ppd")

_PAPEROUT = """#!/bin/sh
if [ $# -eq 0 ]; then echo 'direct paperout "Unknown" "Paper-out test printer"'; exit 0; fi
cat > /dev/null
echo "STATE: +media-empty-error" >&2
echo "ERROR: Out of paper" >&2
exit 1
"""


def cups_available() -> bool:
    return all(Path(p).exists() for p in ("/usr/sbin/cupsd", "/usr/bin/lp", str(CUPS_LIB / "backend/cups-pdf"), str(PPD)))


class CupsPeer:
    """``start()`` → a cupsd with queues ``kiosk`` (cups-pdf) and ``paperout``; ``server`` is host:port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.server = f"127.0.0.1:{self.port}"
        self.name = f"edgetest{secrets.token_hex(4)}"
        self.pdf_dir = root / "pdf"
        self.cups_pdf_conf = Path(f"/etc/cups/cups-pdf-{self.name}.conf")
        self.proc: subprocess.Popen[bytes] | None = None

    def _layout(self) -> None:
        for sub in ("conf", "spool/tmp", "spool/cups-pdf", "cache", "state", "log", "pdf", "bin/backend"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "spool/cups-pdf", 0o1777)
        for entry in CUPS_LIB.iterdir():
            if entry.name != "backend":
                (self.root / "bin" / entry.name).symlink_to(entry)
        for backend in (CUPS_LIB / "backend").iterdir():
            (self.root / "bin/backend" / backend.name).symlink_to(backend)
        paperout = self.root / "bin/backend/paperout"
        paperout.write_text(_PAPEROUT)
        paperout.chmod(0o700)  # not world-executable: cupsd runs it as root, like cups-pdf
        r = self.root
        (r / "cups-files.conf").write_text(
            f"ServerRoot {r}/conf\nRequestRoot {r}/spool\nCacheDir {r}/cache\nStateDir {r}/state\n"
            f"ServerBin {r}/bin\nTempDir {r}/spool/tmp\nErrorLog {r}/log/error_log\nAccessLog {r}/log/access_log\n"
            f"PageLog {r}/log/page_log\nUser lp\nGroup lp\nSystemGroup root\nSandboxing Relaxed\n"
        )
        (r / "cupsd.conf").write_text(
            f"Listen 127.0.0.1:{self.port}\nLogLevel info\nWebInterface No\nBrowsing No\nDefaultAuthType None\n"
            "<Location />\n  Order allow,deny\n  Allow from 127.0.0.1\n</Location>\n"
            "<Policy default>\n  <Limit All>\n    Order deny,allow\n  </Limit>\n</Policy>\n"
        )
        self.cups_pdf_conf.write_text(
            f"Out {self.pdf_dir}\nAnonDirName {self.pdf_dir}\nSpool {r}/spool/cups-pdf\nUserUMask 0022\n"
            "Grp root\nLabel 2\n"  # Label 2: job id in every file name, so none overwrites another
        )

    def start(self) -> CupsPeer:
        self._layout()
        log = open(self.root / "log/cupsd.out", "ab")
        self.proc = subprocess.Popen(
            ["/usr/sbin/cupsd", "-f", "-c", str(self.root / "cupsd.conf"), "-s", str(self.root / "cups-files.conf")],
            stdout=log, stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, timeout=20, proc=self.proc)
        self.lpadmin("-p", "kiosk", "-E", "-v", f"cups-pdf:/{self.name}", "-P", str(PPD))
        self.lpadmin("-p", "paperout", "-E", "-v", "paperout:/", "-P", str(PPD))
        return self

    def lpadmin(self, *args: str) -> None:
        subprocess.run(["lpadmin", "-h", self.server, *args], check=True, capture_output=True, timeout=30)

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool, "-h", self.server, *args], capture_output=True, text=True, timeout=30)

    def wait_for_pdfs(self, count: int, timeout: float = 30.0) -> list[Path]:
        """The PDFs cups-pdf has written, once there are ``count`` complete ones."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = sorted(self.pdf_dir.rglob("*.pdf"), key=lambda p: p.stat().st_mtime)
            if len(found) >= count and all(p.read_bytes().rstrip().endswith(b"%%EOF") for p in found):
                return found
            time.sleep(0.2)
        raise AssertionError(f"cups-pdf wrote {len(list(self.pdf_dir.rglob('*.pdf')))} PDF(s), expected {count}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.cups_pdf_conf.unlink(missing_ok=True)
        shutil.rmtree(self.root / "bin", ignore_errors=True)


@contextmanager
def private_cups() -> Iterator[CupsPeer]:
    """A started CupsPeer in a folder of its own (traversable by the lp user's filters), removed after."""
    root = Path(tempfile.mkdtemp(prefix="edge-cups-"))
    os.chmod(root, 0o755)
    peer = CupsPeer(root)
    try:
        yield peer.start()
    finally:
        peer.stop()
        shutil.rmtree(root, ignore_errors=True)
