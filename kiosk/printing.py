"""Printer backends: CUPS (``lp``/``lpstat``) for page printers, ESC/POS for receipt printers.

Each backend turns a :class:`ReportPage` into its own format, submits it and says what
state the printer is in (ok, offline, paper out, job failed). The kiosk shows any state
but "ok" to the patient as "please ask at reception"; /metrics shows it to ops.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kiosk import metrics
from kiosk.const import PrinterState
from kiosk.i18n import Catalog
from kiosk.printer_state import probe_cups, probe_escpos
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
        """The queue's state as kiosk.printer_state finds it (scheduler, queue, paper, stopped), or the last job's."""
        report = probe_cups(self.queue, self.server)
        if not report.ok:
            return _set_state(report.state)
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
        """Offline when the device is missing; on a character device, the printer's paper sensor."""
        report = probe_escpos(self.device, ask_paper=True)
        if not report.ok:
            return _set_state(report.state)
        return _set_state("job_failed" if self._last_failed else "ok")

    def job_state(self, job: str) -> str:
        return "done"  # bytes written to the device are printed as they arrive
