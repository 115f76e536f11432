"""The DICOM service's own counters (prometheus-client's default registry).

A part owns its metrics; the roof's /metrics (edge.ops.metrics) and the file another process
reads them from (edge.dicom.published_metrics) only collect them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ASSOCIATIONS_OPEN = Gauge("edge_dicom_associations_open", "DICOM associations open now")
ASSOCIATIONS_REJECTED = Counter("edge_dicom_associations_rejected", "Associations rejected (AE title)")
CSTORE_RESULTS = Counter("edge_dicom_cstore", "C-STORE requests answered, by result", ["result"])
RECEIVED_BYTES = Counter("edge_dicom_received_bytes", "Bytes of new instances kept from C-STORE, as received")
