"""The bridge's edge.toml section, [bridge]: which serial ports to watch and how."""

from __future__ import annotations

from pydantic import Field

from edge.config.sections import Section


class BridgeSection(Section):
    enabled: bool = True
    ports: list[str] = Field(default_factory=list)
    # Only our boxes' USB name: a receipt printer on USB-serial must never get our frames.
    port_glob: str = "/dev/serial/by-id/usb-ClinicEdge_ECG*"
    baud: int = Field(default=115200, ge=1200, le=4_000_000)
    rescan_s: float = Field(default=5.0, gt=0, le=3600)
    reconnect_min_s: float = Field(default=0.5, gt=0, le=600)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    silence_s: float = Field(default=5.0, gt=0, le=600)
