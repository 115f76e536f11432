"""Names the store shares with every package."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

DATABASE_NAME: Final = "edge.db"
SPOOL_DIR: Final = "spool"
TMP_DIR: Final = "tmp"
UNREADABLE_DIR: Final = "unreadable"


class SyncState(StrEnum):
    """An outbox row's state; the database holds the value. Only ``sync.outbox`` moves a row between them."""

    PENDING = "pending"
    SENDING = "sending"
    SYNCED = "synced"
    FAILED = "failed"
    QUARANTINED = "quarantined"


class ReportState(StrEnum):
    """A study's report: none yet, ready (pulled from the cloud), printed at the kiosk."""

    NONE = "none"
    READY = "ready"
    PRINTED = "printed"


# Outbox priority: lower goes first. ECGs jump routine images: a chest-pain patient waits.
PRIORITY_STAT: Final = 0
PRIORITY_ECG: Final = 10
PRIORITY_ROUTINE: Final = 50

ECG_SOP_CLASSES: Final = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.1.2",  # General ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.1.3",  # Ambulatory ECG Waveform Storage
    }
)
