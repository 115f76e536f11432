"""Prometheus metrics: in-process counters plus store figures read at scrape time.

Store figures are read from the database when scraped, so ``edge serve console`` in its
own process reports the same queue depth as the process that fills it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from edge.config import EdgeConfig

ASSOCIATIONS_OPEN = Gauge("edge_dicom_associations_open", "DICOM associations open now")
ASSOCIATIONS_REJECTED = Counter("edge_dicom_associations_rejected", "Associations rejected (AE title)")
CSTORE_RESULTS = Counter("edge_dicom_cstore", "C-STORE requests answered, by result", ["result"])


class StoreCollector(Collector):
    """Queue depth, instance counts and disk, straight from the store at scrape time."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        from edge import __version__
        from edge.ops.health import disk_free_bytes
        from edge.store.queries import count_instances, count_missing_files, outbox_summary

        yield InfoMetricFamily("edge_node", "Node identity", value={"node_id": self.config.node.id, "version": __version__})
        studies, instances, size = count_instances()
        yield GaugeMetricFamily("edge_studies", "Studies kept on the node", value=studies)
        yield GaugeMetricFamily("edge_instances", "Instances kept on the node", value=instances)
        yield GaugeMetricFamily("edge_instances_bytes", "Bytes of instances kept", value=size)
        yield GaugeMetricFamily("edge_instance_files_missing", "Instance rows whose file is gone", value=count_missing_files())
        summary = outbox_summary()
        by_state = GaugeMetricFamily("edge_outbox_instances", "Outbox rows by state", labels=["state"])
        for state in ("pending", "sending", "synced", "failed", "quarantined"):
            by_state.add_metric([state], summary.by_state.get(state, 0))
        yield by_state
        yield GaugeMetricFamily("edge_outbox_depth", "Instances not yet in the cloud", value=summary.depth)
        yield GaugeMetricFamily(
            "edge_outbox_oldest_age_seconds",
            "Age of the oldest instance not yet in the cloud",
            value=summary.oldest_pending_age_s or 0.0,
        )
        yield GaugeMetricFamily("edge_disk_free_bytes", "Free bytes on the data disk", value=disk_free_bytes(self.config))


_registered: StoreCollector | None = None


def register_store_collector(config: EdgeConfig) -> None:
    """Register once per process; later calls only update the config it reads."""
    global _registered
    if _registered is None:
        _registered = StoreCollector(config)
        REGISTRY.register(_registered)
    else:
        _registered.config = config
