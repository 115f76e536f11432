"""DICOM status codes the node answers with (PS3.4 Annex B / C-STORE)."""

from __future__ import annotations

from typing import Final

STATUS_SUCCESS: Final = 0x0000
STATUS_OUT_OF_RESOURCES: Final = 0xA700
STATUS_DATASET_MISMATCH: Final = 0xA900
STATUS_CANNOT_UNDERSTAND: Final = 0xC000
STATUS_PROCESSING_FAILURE: Final = 0x0110
