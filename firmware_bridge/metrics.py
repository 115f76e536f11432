"""The ECG boxes for central ops: connected boxes, battery, electrodes and recordings, from the store.

Declared in the bridge's Part (firmware_bridge.part, ``fleet_collectors``), so /metrics and the
heartbeat of ``edge serve console`` and ``edge serve ops`` report the boxes the bridge process
sees. Read at scrape time from the bridge's tables; importing this stays cheap (no pyserial,
no numpy: the bridge's modules are imported when scraped).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from edge.node.config import EdgeConfig

RECORDING_STATES: tuple[str, ...] = ("receiving", "kept", "interrupted", "failed")
"""The states of ``ecg_recording.state`` (firmware_bridge.tables.EcgRecording), always reported."""


def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            "edge_ecg_boxes_connected",
            "ECG boxes connected to the bridge now (heard from lately, as edge status counts them), from the store",
        ),
        GaugeMetricFamily(
            "edge_ecg_box_battery_percent", "Battery of each connected ECG box, percent, as its last STATUS said",
            labels=["box_id"],
        ),
        GaugeMetricFamily(
            "edge_ecg_box_lead_off", "1 when a connected ECG box reports any electrode off, by box", labels=["box_id"],
        ),
        GaugeMetricFamily(
            "edge_ecg_recordings",
            "ECG recordings by state over all time, from the store (a gauge: a failed recording the box "
            "offers again moves to receiving, then kept)",
            labels=["state"],
        ),
    )


class BridgeCollector(Collector):
    """The bridge's tables at scrape time; the same figures from whichever process scrapes."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """Names only: registering must not read the store."""
        yield from _families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from peewee import fn

        from edge.store.rows import rows
        from firmware_bridge.boxes import box_summaries
        from firmware_bridge.tables import EcgRecording

        connected_family, battery, lead_off, recordings = _families()
        connected = [box for box in box_summaries() if box["connected"]]  # its freshness rule, not the raw flag
        connected_family.add_metric([], len(connected))
        for box in connected:
            if box["battery_pct"] is not None:  # no STATUS since its HELLO yet
                battery.add_metric([box["box_id"]], box["battery_pct"])
            lead_off.add_metric([box["box_id"]], 1.0 if box["lead_off"] else 0.0)
        counts = dict(rows(
            EcgRecording.select(EcgRecording.state, fn.COUNT(EcgRecording.id)).group_by(EcgRecording.state),
            tuple[str, int],
        ))
        for state in (*RECORDING_STATES, *sorted(set(counts) - set(RECORDING_STATES))):
            recordings.add_metric([state], counts.get(state, 0))
        yield from (connected_family, battery, lead_off, recordings)

