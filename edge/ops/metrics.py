"""Prometheus metrics: in-process counters plus store figures read at scrape time.

Store figures are read from the database when scraped, so ``edge serve console`` in its
own process reports the same queue depth as the process that fills it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from edge.dicom import metrics as dicom_counters  # noqa: F401  (the counters are on /metrics in every process)
from edge.part import FleetCollectorFactory
from edge.store.const import SyncState

if TYPE_CHECKING:
    from edge.node.config import EdgeConfig


PROCESS_STARTED_AT = time.time()
"""When this process started: ``edge_node_start_time_seconds`` (uptime = now - this)."""


def part_collectors() -> tuple[FleetCollectorFactory, ...]:
    """Every part's store-derived figures (the bridge's boxes), as its Part declares them: they
    join the heartbeat, the textfile and /metrics in every process that serves either."""
    from edge.node.parts import PARTS_IN_ORDER

    return tuple(factory for part in PARTS_IN_ORDER for factory in part.fleet_collectors)


class StoreCollector(Collector):
    """Queue depth, instance counts and disk, straight from the store at scrape time."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        from edge import __version__
        from edge.ops.health import disk_free_bytes
        from edge.store.queries import (
            count_instances,
            count_missing_files,
            outbox_summary,
        )

        yield InfoMetricFamily("edge_node", "Node identity", value={"node_id": self.config.node.id, "version": __version__})
        studies, instances, size = count_instances()
        yield GaugeMetricFamily("edge_studies", "Studies kept on the node", value=studies)
        yield GaugeMetricFamily("edge_instances", "Instances kept on the node", value=instances)
        yield GaugeMetricFamily("edge_instances_bytes", "Bytes of instances kept", value=size)
        yield GaugeMetricFamily("edge_instance_files_missing", "Instance rows whose file is gone", value=count_missing_files())
        summary = outbox_summary()
        by_state = GaugeMetricFamily("edge_outbox_instances", "Outbox rows by state", labels=["state"])
        for state in SyncState:
            by_state.add_metric([state], summary.by_state.get(state, 0))
        yield by_state
        yield GaugeMetricFamily("edge_outbox_depth", "Instances not yet in the cloud", value=summary.depth)
        yield GaugeMetricFamily(
            "edge_outbox_oldest_age_seconds",
            "Age of the oldest instance not yet in the cloud",
            value=summary.oldest_pending_age_s or 0.0,
        )
        yield GaugeMetricFamily("edge_disk_free_bytes", "Free bytes on the data disk", value=disk_free_bytes(self.config))
        yield GaugeMetricFamily(
            "edge_outbox_last_upload_timestamp_seconds",
            "When the cloud last confirmed an instance (0 = never), from the store",
            value=_timestamp(summary.last_upload_at),
        )
        yield GaugeMetricFamily(
            "edge_node_start_time_seconds", "When this node process started (Unix time)", value=PROCESS_STARTED_AT
        )


def _timestamp(iso_utc: str | None) -> float:
    import datetime as dt

    if not iso_utc:
        return 0.0
    return dt.datetime.fromisoformat(iso_utc).timestamp()  # "…Z" is UTC


class HealthCollector(Collector):
    """The /healthz checks as gauges, so central ops alert on the same verdicts the technician sees."""

    def __init__(self, config: EdgeConfig, services: tuple[str, ...]) -> None:
        self.config = config
        self.services = services

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from edge.ops.health import (
            dicom_availability,
            health_report,
            port_listening,
            run_checks,
        )

        checks = run_checks(self.config, self.services)
        healthy, _ = health_report(self.config, checks)
        family = GaugeMetricFamily(
            "edge_health_check_ok", "1 when a /healthz check passes, by check", labels=["check", "critical"]
        )
        for check in checks:
            family.add_metric([check.name, str(check.critical).lower()], 1.0 if check.ok else 0.0)
        yield family
        yield GaugeMetricFamily("edge_healthy", "1 when /healthz answers 200 (no critical check failing)", value=float(healthy))
        up = GaugeMetricFamily("edge_service_up", "1 when the service is running (DICOM: its own report; console: its port)",
                               labels=["service"])
        dicom = dicom_availability(self.config)  # never a connection to the DICOM port: it would take a slot
        up.add_metric(["dicom"], float(dicom is not None))
        console = self.config.console
        up.add_metric(["console"], float(port_listening(console.bind_address, console.port)))
        yield up
        slots = GaugeMetricFamily("edge_dicom_associations", "DICOM association slots, as the DICOM service counts them",
                                  labels=["held"])
        if dicom is not None:
            slots.add_metric(["in_use"], dicom.slots_used)
            slots.add_metric(["by_strangers"], dicom.held_by_strangers)
            slots.add_metric(["max"], dicom.slots_max)
        yield slots
        yield GaugeMetricFamily("edge_dicom_accepting", "1 when the DR would get an association now",
                                value=float(dicom is not None and dicom.accepting))


def fleet_registry(config: EdgeConfig, services: tuple[str, ...] = ("dicom", "sync")) -> CollectorRegistry:
    """What the heartbeat and the textfile carry: store and health figures, the same from any process.

    In-process counters are left out on purpose: under systemd each service is its own
    process, and only what comes from the store and the ports means the same everywhere.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(config))
    registry.register(HealthCollector(config, services))
    for factory in part_collectors():
        registry.register(factory(config))
    return registry


_registered: tuple[StoreCollector, HealthCollector] | None = None
_registered_factories: list[FleetCollectorFactory] = []


def register_store_collector(config: EdgeConfig, services: tuple[str, ...] = ("dicom",)) -> None:
    """Register once per process; later calls only update the config (and services) they read."""
    global _registered
    if _registered is None:
        _registered = (StoreCollector(config), HealthCollector(config, services))
        for collector in _registered:
            REGISTRY.register(collector)
    else:
        _registered[0].config = config
        _registered[1].config, _registered[1].services = config, services
    for factory in part_collectors():
        if factory not in _registered_factories:
            REGISTRY.register(factory(config))
            _registered_factories.append(factory)
