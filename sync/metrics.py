"""Upload and report counters for ops, in this process (gauges from the store are in edge.ops.metrics)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge

UPLOADED_BYTES = Counter("edge_sync_upload_bytes", "Bytes of DICOM sent to the cloud (after compression)")
INSTANCES_SYNCED = Counter("edge_sync_instances_synced", "Instances the cloud confirmed stored")
FAILURES = Counter("edge_sync_failures", "Failed uploads by reason", ["reason"])
LAST_SUCCESS = Gauge("edge_sync_last_success_timestamp_seconds", "When the cloud last confirmed an upload")
REPORTS_PULLED = Counter("edge_reports_pulled", "Reports fetched from the cloud")

for _reason in ("connection", "timeout", "server_error", "auth", "throttled", "refused", "not_stored"):
    FAILURES.labels(_reason)


def record_synced(instances: int, nbytes: int) -> None:
    INSTANCES_SYNCED.inc(instances)
    UPLOADED_BYTES.inc(nbytes)
    LAST_SUCCESS.set(time.time())
