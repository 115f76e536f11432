"""What happens to a kept study before its upload: it finds its order, and a STAT order's late images go first.

Runs in the sync service, not in a page handler (before, only an open console's Today
page matched, so with no one looking nothing was matched and a STAT visit's late images
waited behind routine ones) and not after ``keep_instance`` either. Why the sync loop:

- it is the one place every kept instance reaches: the DICOM service and the ECG bridge
  (in this process or another, through the outbox bell) both wake it;
- it orders the queue, so raising a STAT order's arrivals here, just before the worker
  is woken to claim, means a late STAT image is at the front when the next claim looks;
- the C-STORE and the ECG ACK stay as lean as ingest made them: no order queries while
  a modality waits for its answer, one pass per burst of arrivals instead of per instance;
- it runs whether uploads are on or off and whether the cloud answers or not (the
  matching is the console's business, and a technician needs it while the link is down).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edge.orders.matching import match_new_studies
from sync.outbox import raise_stat_arrivals

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArrivalsPass:
    matched: int  # studies that found their order in this pass
    raised: int  # instances of STAT orders moved to the front


def look_at_arrivals() -> ArrivalsPass:
    """Match new studies to orders first, then raise STAT: a new study of a STAT order is raised in the same pass."""
    matched = match_new_studies()
    raised = raise_stat_arrivals()
    if raised:
        log.info("sync: %d late instance(s) of STAT orders moved to the front of the queue", raised)
    return ArrivalsPass(matched, raised)
