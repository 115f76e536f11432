"""What is wrong with the kiosk printer, in one typed probe every process can run.

The kiosk sends the patient to reception when it cannot print; the technician there needs
the real cause and what to do about it, in their words — "the print service (CUPS) is not
running", not "offline". The probe asks CUPS itself (``lpstat``), so the console's Today
view, ``edge status``, the heartbeat and ``edge doctor`` all say the same thing whichever
process runs them. An ESC/POS receipt printer is only asked about paper by the kiosk's own
process and doctor (the question is bytes on the printer's line).
"""

from __future__ import annotations

import os
import select
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kiosk.const import PrinterState

if TYPE_CHECKING:
    from edge.node.config import EdgeConfig

PrinterCause = Literal["ok", "scheduler_down", "queue_missing", "paper_out", "stopped", "offline", "no_cups_client"]
PRINTER_CAUSES: Final[tuple[PrinterCause, ...]] = (
    "ok", "scheduler_down", "queue_missing", "paper_out", "stopped", "offline", "no_cups_client",
)
PROBE_TIMEOUT_S: Final = 5.0
_C_LOCALE = {"LC_ALL": "C", "LANG": "C"}  # lpstat's words are parsed: never a translated message
_PAPER_ALERTS = ("media-empty", "media-needed", "media-jam", "input-tray-missing")
_STATUS_PAPER = b"\x10\x04\x04"  # ESC/POS DLE EOT 4: the paper roll sensor


@dataclass(frozen=True)
class PrinterReport:
    """One look at the kiosk printer: the cause, a short summary and the fix, for a technician."""

    cause: PrinterCause
    where: str  # "CUPS queue 'kiosk'" / "receipt printer at /dev/usb/lp0"
    summary: str  # "CUPS scheduler is not running"; "ready" when ok
    fix: str = ""  # what to do, "" when ok

    @property
    def ok(self) -> bool:
        return self.cause == "ok"

    @property
    def state(self) -> PrinterState:
        """The kiosk's coarser state (its gauges and the patient's screen): ok, paper out or offline."""
        return "ok" if self.ok else "paper_out" if self.cause == "paper_out" else "offline"

    def as_dict(self) -> dict[str, str | bool]:
        return {"ok": self.ok, "cause": self.cause, "where": self.where, "summary": self.summary, "fix": self.fix}


def _lpstat(server: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["lpstat", *(["-h", server] if server else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False,
                          env={**os.environ, **_C_LOCALE})


def probe_cups(queue: str, server: str = "") -> PrinterReport:
    """The queue as CUPS reports it: scheduler, queue, paper (printer-state-reasons), stopped, offline."""
    where = f"CUPS queue '{queue}'" + (f" on {server}" if server else "")
    on = f" on {server}" if server else ""
    try:
        queue_state = _lpstat(server, "-l", "-p", queue)
        if queue_state.returncode != 0 or f"printer {queue} " not in queue_state.stdout:
            # lpstat says "Invalid destination" for a missing queue *and* when the scheduler is down: ask which.
            if "scheduler is running" not in _lpstat(server, "-r").stdout:
                start = (f"start CUPS on {server} (sudo systemctl start cups there)" if server else
                         "start the print service (CUPS) on this box: sudo systemctl start cups, or restart the box")
                return PrinterReport("scheduler_down", where, "CUPS scheduler is not running",
                                     f"{start}; `lpstat -r` then says \"scheduler is running\"")
            return PrinterReport(
                "queue_missing", where, f"the print queue '{queue}' does not exist{on}",
                f"add the printer as queue '{queue}' (CUPS web page, or sudo lpadmin -p {queue} -E -v URI "
                f"-m everywhere), or set [kiosk] cups_queue to a queue `lpstat -p` lists")
    except FileNotFoundError:
        return PrinterReport("no_cups_client", where, "the CUPS client (lpstat, lp) is not installed",
                             "install it: sudo apt-get install cups-client")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return PrinterReport("scheduler_down", where, f"CUPS scheduler is not answering ({type(exc).__name__})",
                             "restart the print service: sudo systemctl restart cups")
    lines = queue_state.stdout.splitlines()
    alerts = " ".join(line.split(":", 1)[1] for line in lines if line.strip().startswith("Alerts:"))
    disabled = "disabled" in lines[0]
    rejecting = any(line.strip() == "Rejecting Jobs" for line in lines)
    resume = f"; then resume the queue: cupsenable {queue}" if disabled else ""
    if "media-jam" in alerts:
        return PrinterReport("paper_out", where, "paper jammed", f"open the printer and take out the jammed paper{resume}")
    if any(reason in alerts for reason in _PAPER_ALERTS):
        return PrinterReport("paper_out", where, "out of paper (media empty)", f"load paper into the printer{resume}")
    if "offline" in alerts or "connecting-to-device" in alerts:
        return PrinterReport("offline", where, "the printer does not answer (offline)",
                             f"switch the printer on and check its cable or network{resume}")
    if disabled:
        return PrinterReport("stopped", where, "the print queue is stopped (disabled)",
                             f"fix what stopped it (paper, cable), then start the queue: cupsenable {queue}")
    if rejecting:
        return PrinterReport("stopped", where, "the print queue refuses new jobs (rejecting)",
                             f"let it take jobs again: cupsaccept {queue}")
    return PrinterReport("ok", where, "ready")


def probe_escpos(device: Path, ask_paper: bool = False) -> PrinterReport:
    """The receipt printer's device is there; with ``ask_paper``, the printer's own paper sensor."""
    where = f"receipt printer at {device}"
    try:
        mode = device.stat().st_mode
    except FileNotFoundError:
        if device.parent.is_dir() and not str(device).startswith("/dev/"):
            return PrinterReport("ok", where, "ready")  # a plain file target (tests, spooling) is made on first print
        return PrinterReport("offline", where, "the receipt printer is not connected",
                             f"plug the receipt printer's USB cable in and switch it on ({device} must exist)")
    except OSError as exc:
        return PrinterReport("offline", where, f"the receipt printer cannot be reached ({exc.strerror})",
                             "unplug and replug the receipt printer's USB cable")
    if ask_paper and stat.S_ISCHR(mode):
        paper = _ask_paper_status(device)
        if paper is not None and paper & 0x60:  # bits 5-6: paper roll end detected
            return PrinterReport("paper_out", where, "out of paper", "load a new paper roll")
    return PrinterReport("ok", where, "ready")


def _ask_paper_status(device: Path, timeout: float = 0.5) -> int | None:
    try:
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        os.write(fd, _STATUS_PAPER)
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return None
        answer = os.read(fd, 1)
        return answer[0] if answer else None
    except OSError:
        return None
    finally:
        os.close(fd)


def probe_printer(config: EdgeConfig, ask_paper: bool = False) -> PrinterReport:
    """The configured kiosk printer, whichever backend ``[kiosk] printer`` names."""
    k = config.kiosk
    if k.printer == "escpos":
        return probe_escpos(config.path(k.escpos_device) or Path(k.escpos_device), ask_paper)
    return probe_cups(k.cups_queue, k.cups_server)


_cache_lock = threading.Lock()
_cache: dict[tuple[str, str, str, str], tuple[float, PrinterReport]] = {}


def recent_printer_report(config: EdgeConfig, max_age_s: float | None = None) -> PrinterReport:
    """probe_printer at most once per ``max_age_s`` (default ``[kiosk] printer_check_interval_s``) per printer:
    the Today page's live refresh and every /metrics scrape must not each start ``lpstat``."""
    k = config.kiosk
    key = (k.printer, k.cups_queue, k.cups_server, k.escpos_device)
    age = k.printer_check_interval_s if max_age_s is None else max_age_s
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < age:
            return hit[1]
    report = probe_printer(config)
    with _cache_lock:
        _cache[key] = (time.monotonic(), report)
    return report


def _ready_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "edge_kiosk_printer_ready",
        "1 when the kiosk printer can print, 0 when patients are sent to reception; reason: ok, scheduler_down, "
        "queue_missing, paper_out, stopped, offline, no_cups_client (the probe every process runs)",
        labels=["reason"],
    )


class PrinterCollector(Collector):
    """The kiosk printer's probe at scrape time, for the heartbeat, the textfile and /metrics in any process.

    Its own name beside the kiosk process's ``edge_kiosk_printer_ok``: in ``edge run`` both are on one registry.
    """

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """Names only: registering must not start lpstat."""
        yield _ready_family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = recent_printer_report(self.config)
        family = _ready_family()
        family.add_metric([report.cause], 1.0 if report.ok else 0.0)
        yield family
