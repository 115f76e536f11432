"""The bridge's ``edge doctor`` item: every serial port listed in [bridge] is there."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edge.part import DoctorItem as Item

if TYPE_CHECKING:
    from edge.node.config import EdgeConfig


def check_boxes(config: EdgeConfig) -> Item:
    """Serial ECG boxes: every port listed in [bridge] present; skipped where the clinic has none."""
    bridge = getattr(config, "bridge", None)
    if bridge is None or not getattr(bridge, "enabled", True):
        return Item("boxes", "skip", "ECG bridge not enabled on this node")
    import glob

    listed = [str(p) for p in getattr(bridge, "ports", [])]
    pattern = str(getattr(bridge, "port_glob", "") or "")
    plugged = sorted(glob.glob(pattern)) if pattern else []
    if not listed and not plugged:
        return Item("boxes", "skip", f"no ECG box configured or plugged in ([bridge] ports empty, nothing at {pattern or '-'})")
    missing = [p for p in listed if not Path(p).exists()]
    if missing:
        return Item("boxes", "fail", f"serial port(s) missing: {', '.join(missing)}",
                    "plug the ECG box's USB cable in (and switch it on); check `ls /dev/serial/by-id/` against [bridge] ports")
    present = sorted(set(listed) | set(plugged))
    return Item("boxes", "pass", f"serial port(s) present: {', '.join(present)}")
