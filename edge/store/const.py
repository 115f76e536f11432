"""Names the store shares with every package."""

from __future__ import annotations

from typing import Final, Literal

DATABASE_NAME: Final = "edge.db"
SPOOL_DIR: Final = "spool"
TMP_DIR: Final = "tmp"
UNREADABLE_DIR: Final = "unreadable"

SyncState = Literal["pending", "sending", "synced", "failed", "quarantined"]
ReportState = Literal["none", "ready", "printed"]

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
