"""The kiosk's ``edge doctor`` item: its printer backend can print now (CUPS queue or ESC/POS device)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.part import DoctorItem as Item
from edge.ports import port_listening

if TYPE_CHECKING:
    from edge.node.config import EdgeConfig

_PRINTER_HINTS = {
    "offline": {
        "cups": "check the printer is on and cabled, then `lpstat -p {queue}`; cupsenable {queue} if disabled; "
                "the queue must exist (lpadmin -p {queue} -E -v … -m everywhere)",
        "escpos": "plug the receipt printer's USB cable in and switch it on ({device} must exist)",
    },
    "paper_out": {"cups": "load paper", "escpos": "load a new paper roll"},
}


def check_printer(config: EdgeConfig, require_kiosk: bool = True) -> Item:
    """The kiosk's own printer backend says whether it can print now (CUPS queue or ESC/POS device)."""
    k = config.kiosk
    if require_kiosk and not port_listening(k.bind_address, k.port):
        return Item("printer", "skip", "kiosk not running on this node: printer not checked")
    from kiosk.app import make_printer

    where = f"CUPS queue {k.cups_queue!r}" if k.printer == "cups" else f"ESC/POS printer at {k.escpos_device}"
    state = make_printer(config).state()
    if state == "ok":
        return Item("printer", "pass", f"{where} ready")
    if state == "job_failed":
        return Item("printer", "warn", f"{where}: the last print job failed", "check the printer, then print a test page")
    hint = _PRINTER_HINTS.get(state, {}).get(k.printer, "check the printer")
    return Item("printer", "fail", f"{where}: {state.replace('_', ' ')}",
                hint.format(queue=k.cups_queue, device=k.escpos_device))
