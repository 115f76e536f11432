"""The kiosk's Prometheus metrics, in the process registry (so `edge run`'s console /metrics has them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from kiosk.const import PRINTER_STATES, PrinterState

PRINTER_STATE = Gauge("edge_kiosk_printer_state", "Kiosk printer state: 1 for the current state", ["state"])
PRINTER_OK = Gauge("edge_kiosk_printer_ok", "1 when the kiosk printer can print, 0 when patients are sent to reception")
LOOKUPS = Counter("edge_kiosk_lookups", "Kiosk code + PIN lookups, by outcome", ["outcome"])
PRINTS = Counter("edge_kiosk_prints", "Kiosk print attempts, by outcome", ["outcome"])
PRINT_SECONDS = Histogram(
    "edge_kiosk_print_seconds", "From Print pressed to the job accepted by the printer",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)

for _state in PRINTER_STATES:
    PRINTER_STATE.labels(_state).set(1 if _state == "unknown" else 0)
PRINTER_OK.set(0)


def set_printer_state(state: PrinterState) -> None:
    for name in PRINTER_STATES:
        PRINTER_STATE.labels(name).set(1 if name == state else 0)
    PRINTER_OK.set(1 if state == "ok" else 0)
