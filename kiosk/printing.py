"""Printer backends: CUPS (``lp``/``lpstat``) for page printers, ESC/POS for receipt printers.

Each backend turns a :class:`ReportPage` into its own format, submits it and says what
state the printer is in (ok, offline, paper out, job failed). The kiosk shows any state
but "ok" to the patient as "please ask at reception"; /metrics shows it to ops.
"""

from __future__ import annotations

import logging
import os
import re
import select
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kiosk import metrics
from kiosk.const import PrinterState
from kiosk.i18n import Catalog
from kiosk.receipt import render_receipt
from kiosk.report_pdf import ReportPage, render_report_pdf

log = logging.getLogger(__name__)

JOB_TITLE = "clinic-report"  # CUPS logs job titles: never a patient's name
_REQUEST_ID = re.compile(r"request id is (\S+)")
LP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class PrintResult:
    ok: bool
    job: str = ""
    state: PrinterState = "ok"
    detail: str = ""  # for the audit log and ops; never shown to the patient


class PrinterBackend(Protocol):
    name: str

    def render(self, page: ReportPage, t: Catalog) -> bytes: ...

    def submit(self, document: bytes) -> PrintResult: ...

    def state(self) -> PrinterState: ...

    def job_state(self, job: str) -> str: ...


def _set_state(state: PrinterState) -> PrinterState:
    metrics.set_printer_state(state)
    return state


class CupsPrinter:
    """A CUPS queue through the ``lp`` and ``lpstat`` clients (cups-client)."""

    name = "cups"

    def __init__(self, queue: str, server: str = "") -> None:
        self.queue = queue
        self.server = server
        self._last_failed = False

    def _cmd(self, tool: str, *args: str) -> list[str]:
        return [tool, *(["-h", self.server] if self.server else []), *args]

    def render(self, page: ReportPage, t: Catalog) -> bytes:
        return render_report_pdf(page, t)

    def submit(self, document: bytes) -> PrintResult:
        """Hand the PDF to CUPS; ok once CUPS has accepted the job (it prints on its own)."""
        cmd = self._cmd("lp", "-d", self.queue, "-t", JOB_TITLE, "-o", "media=A4", "-o", "fit-to-page", "--", "-")
        try:
            done = subprocess.run(cmd, input=document, capture_output=True, timeout=LP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._last_failed = True
            return PrintResult(False, state=_set_state("offline"), detail=f"lp: {exc}")
        out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        match = _REQUEST_ID.search(out)
        if done.returncode != 0 or not match:
            self._last_failed = True
            state = self.state()
            if state == "ok":
                state = _set_state("job_failed")
            return PrintResult(False, state=state, detail=" ".join(out.split())[:300])
        self._last_failed = False
        return PrintResult(True, job=match.group(1), state="ok")

    def state(self) -> PrinterState:
        """The queue's state from ``lpstat -l -p``: disabled/unreachable → offline, media-empty → paper_out."""
        try:
            done = subprocess.run(self._cmd("lpstat", "-l", "-p", self.queue), capture_output=True, text=True,
                                  timeout=LP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return _set_state("offline")
        text = done.stdout
        if done.returncode != 0 or f"printer {self.queue} " not in text:
            return _set_state("offline")
        alerts = " ".join(line.split(":", 1)[1] for line in text.splitlines() if line.strip().startswith("Alerts:"))
        if "media-empty" in alerts or "media-needed" in alerts or "media-jam" in alerts:
            return _set_state("paper_out")
        if "disabled" in text.splitlines()[0] or "offline" in alerts:
            return _set_state("offline")
        return _set_state("job_failed" if self._last_failed else "ok")

    def job_state(self, job: str) -> str:
        """"pending" while CUPS still holds the job, "held" when it is stuck, else "done"."""
        try:
            done = subprocess.run(self._cmd("lpstat", "-l", "-W", "not-completed", "-o", self.queue),
                                  capture_output=True, text=True, timeout=LP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "pending"
        block: list[str] = []
        for line in done.stdout.splitlines():
            if line.startswith(job + " "):
                block = [line]
            elif block and line.startswith(("\t", " ")):
                block.append(line)
            elif block:
                break
        if not block:
            return "done"
        text = " ".join(block)
        if "held" in text or "Status:" in text and "resources-are-not-ready" in text:
            self._last_failed = True
            return "held"
        return "pending"


class EscposPrinter:
    """An 80 mm receipt printer on a device path (USB ``/dev/usb/lp0``, a serial port, a file)."""

    name = "escpos"
    STATUS_PAPER = b"\x10\x04\x04"  # DLE EOT 4: real-time paper roll sensor status

    def __init__(self, device: Path) -> None:
        self.device = device
        self._last_failed = False

    def render(self, page: ReportPage, t: Catalog) -> bytes:
        return render_receipt(page, t)

    def submit(self, document: bytes) -> PrintResult:
        state = self.state()
        if state in ("offline", "paper_out"):
            return PrintResult(False, state=state, detail=f"printer {state}")
        try:
            flags = os.O_WRONLY | os.O_APPEND | (0 if self.device.exists() else os.O_CREAT)
            fd = os.open(self.device, flags, 0o600)
            try:
                view = memoryview(document)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:
            self._last_failed = True
            return PrintResult(False, state=_set_state("job_failed"), detail=f"{self.device}: {exc.strerror}")
        self._last_failed = False
        _set_state("ok")
        return PrintResult(True, job=f"escpos-{time.time_ns()}", state="ok")

    def state(self) -> PrinterState:
        """Offline when the device is missing; on a character device, ask the printer about paper."""
        try:
            mode = self.device.stat().st_mode
        except FileNotFoundError:
            # A plain file target (tests, spooling) is created on first print.
            return _set_state("ok" if self.device.parent.is_dir() and not str(self.device).startswith("/dev/")
                              else "offline")
        except OSError:
            return _set_state("offline")
        if stat.S_ISCHR(mode):
            paper = self._ask_paper_status()
            if paper is not None and paper & 0x60:  # bits 5-6: paper roll end detected
                return _set_state("paper_out")
        return _set_state("job_failed" if self._last_failed else "ok")

    def _ask_paper_status(self, timeout: float = 0.5) -> int | None:
        try:
            fd = os.open(self.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            os.write(fd, self.STATUS_PAPER)
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            answer = os.read(fd, 1)
            return answer[0] if answer else None
        except OSError:
            return None
        finally:
            os.close(fd)

    def job_state(self, job: str) -> str:
        return "done"  # bytes written to the device are printed as they arrive
