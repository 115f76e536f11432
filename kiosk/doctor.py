"""The kiosk's ``edge doctor`` item: its printer backend can print now (CUPS queue or ESC/POS device)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.part import DoctorItem as Item
from edge.ports import port_listening

if TYPE_CHECKING:
    from edge.node.config import EdgeConfig

def check_printer(config: EdgeConfig, require_kiosk: bool = True) -> Item:
    """The kiosk printer can print now; else the real cause (CUPS down, no queue, paper, stopped) and its fix."""
    k = config.kiosk
    if require_kiosk and not port_listening(k.bind_address, k.port):
        return Item("printer", "skip", "kiosk not running on this node: printer not checked")
    from kiosk.printer_state import probe_printer

    report = probe_printer(config, ask_paper=True)
    if report.ok:
        return Item("printer", "pass", f"{report.where} ready")
    return Item("printer", "fail", f"{report.where}: {report.summary}", report.fix)
