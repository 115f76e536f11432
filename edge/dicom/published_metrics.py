"""The DICOM service's in-process counters, for a /metrics served by another process.

C-STORE results, received bytes and association counts live in the DICOM process's
memory, but `edge run` keeps ingest in a process of its own (edge.node.supervisor) and the
systemd units run the DICOM service and the console apart. So the DICOM process writes
them (Prometheus text format, one atomic rename, no fsync: a few hundred microseconds) to
``<data_dir>/run/dicom.prom`` before it answers Success to each kept instance, and every
``WRITE_EVERY_S`` for the rest (associations, refusals); the console's /metrics, in a process
without the DICOM service, shows that file's families in place of its own zero copies. A
file not rewritten for ``STALE_AFTER_S`` belongs to a DICOM service that is gone: left out,
as a restarted process's counters would start again from zero anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from edge.dicom import metrics as dicom_counters
from edge.service import BackgroundTasks

log = logging.getLogger(__name__)

DICOM_METRICS = (
    dicom_counters.ASSOCIATIONS_OPEN,
    dicom_counters.ASSOCIATIONS_REJECTED,
    dicom_counters.CSTORE_RESULTS,
    dicom_counters.RECEIVED_BYTES,
)
WRITE_EVERY_S = 5.0
STALE_AFTER_S = 30.0


def metrics_path(data_dir: Path) -> Path:
    return data_dir / "run" / "dicom.prom"


class DicomMetricsWriter:
    """In the DICOM process: keeps ``dicom.prom`` current. ``write()`` is safe from any thread."""

    def __init__(self, data_dir: Path) -> None:
        self.path = metrics_path(data_dir)
        self._registry = CollectorRegistry(auto_describe=False)
        for metric in DICOM_METRICS:
            self._registry.register(metric)
        self._tasks = BackgroundTasks("dicom")

    def write(self) -> None:
        """Now, from an association thread or the loop: the C-STORE's figures are on /metrics before its Success."""
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp.write_bytes(generate_latest(self._registry))
            os.replace(temp, self.path)
        except OSError as exc:  # a full disk: /metrics shows the last figures written, then none
            log.debug("dicom: cannot write %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                temp.unlink()

    async def start(self) -> None:
        self._tasks.start(self._keep_writing(), name="dicom metrics")

    async def _keep_writing(self) -> None:
        while True:
            await asyncio.to_thread(self.write)
            await asyncio.sleep(WRITE_EVERY_S)

    async def stop(self) -> None:
        await self._tasks.stop()
        await asyncio.to_thread(self.write)


class _PublishedDicomMetrics(Collector):
    """In the console's process: the DICOM process's figures, read at scrape time."""

    def __init__(self, data_dir: Path) -> None:
        self.path = metrics_path(data_dir)

    def describe(self) -> Iterable[Metric]:
        return []  # read only when scraped, not at registration

    def collect(self) -> Iterable[Metric]:
        try:
            if time.time() - self.path.stat().st_mtime > STALE_AFTER_S:
                return []
            text = self.path.read_text()
        except OSError:
            return []
        return list(text_string_to_metric_families(text))


_shown = False


def show_published_dicom_metrics(data_dir: Path) -> None:
    """Once per process without the DICOM service: /metrics shows the DICOM process's figures, not this one's zeros."""
    global _shown
    if _shown:
        return
    for metric in DICOM_METRICS:
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(metric)
    REGISTRY.register(_PublishedDicomMetrics(data_dir))
    _shown = True
